"""node.gc_policy: a running node collects young garbage rarely, and gives the process its setting back."""

from __future__ import annotations

import gc
import uuid
from collections.abc import Iterator

import pytest

from lock_backends.memory import drop_store
from node import gc_policy
from node.app import Node
from node.config import Settings
from node.jobs import JobRegistry


@pytest.fixture(autouse=True)
def threshold(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[int, int, int]]:
    """The process's thresholds as a host application left them (700 young), restored after each test;
    no node of another test counted as running (a test that never stopped its node would be one)."""
    monkeypatch.setattr(gc_policy, "_users", 0)
    monkeypatch.setattr(gc_policy, "_saved", None)
    saved = gc.get_threshold()
    gc.set_threshold(700, saved[1], saved[2])
    yield gc.get_threshold()
    gc.set_threshold(*saved)


def test_nested_nodes_raise_it_once_and_the_last_one_out_restores_it(threshold: tuple[int, int, int]) -> None:
    gc_policy.acquire()
    gc_policy.acquire()
    assert gc.get_threshold() == (gc_policy.YOUNG_THRESHOLD, *threshold[1:])
    gc_policy.release()
    assert gc.get_threshold()[0] == gc_policy.YOUNG_THRESHOLD  # the other node still runs
    gc_policy.release()
    assert gc.get_threshold() == threshold
    gc_policy.release()  # one release too many changes nothing
    assert gc.get_threshold() == threshold


@pytest.mark.parametrize("young", [0, gc_policy.YOUNG_THRESHOLD * 2])
def test_a_process_that_turned_collection_off_or_set_more_keeps_its_setting(young: int) -> None:
    gc.set_threshold(young)
    gc_policy.acquire()
    assert gc.get_threshold()[0] == young
    gc_policy.release()
    assert gc.get_threshold()[0] == young


def test_a_setting_the_host_changed_while_the_node_ran_is_left_as_the_host_set_it() -> None:
    gc_policy.acquire()
    gc.set_threshold(5_000)
    gc_policy.release()
    assert gc.get_threshold()[0] == 5_000


def test_a_node_started_after_the_host_lowered_it_raises_it_again_and_restores_the_new_value(
        threshold: tuple[int, int, int]) -> None:
    gc_policy.acquire()
    gc.set_threshold(1_000)  # the host, while one node runs
    gc_policy.acquire()  # a second node
    assert gc.get_threshold()[0] == gc_policy.YOUNG_THRESHOLD
    gc_policy.release()
    gc_policy.release()
    assert gc.get_threshold() == (1_000, *threshold[1:])


async def test_a_node_raises_it_while_it_runs_and_restores_it_when_it_stops(
        threshold: tuple[int, int, int]) -> None:
    store = f"gc-{uuid.uuid4().hex[:8]}"
    node = Node(Settings(node_id="gc", lock_url=f"memory://{store}", demo_jobs=False, lease_ttl=2.0,
                         renew_deadline=1.4, retry_period=0.2), JobRegistry())
    try:
        await node.start()
        assert gc.get_threshold()[0] == gc_policy.YOUNG_THRESHOLD
    finally:
        await node.stop()
        drop_store(store)
    assert gc.get_threshold() == threshold
    await node.stop()  # a second stop owes nothing more
    assert gc.get_threshold() == threshold
