"""What the backends store as JSON: orjson writes it, and it reads back as ``json.dumps``'s would.

``lock_backends._common.compact_json`` hands every run record to orjson (a tenth of
``json.dumps``'s time, ten thousand records a second at the top rate) and what orjson
would write differently in value, or accept where ``json.dumps`` refuses, to ``json.dumps``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lock_backends._common import compact_json

# JSON values of every kind, with what orjson handles unlike json.dumps among them: NaN and the
# infinities, integers past 64 bits, lone surrogates and other odd text, non-ASCII text
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2 ** 70), 2 ** 70) | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12)


def _same(a: Any, b: Any) -> bool:
    """Equal as JSON values, NaN equal to NaN."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


@settings(max_examples=400, deadline=None)
@given(JSON_VALUES, st.booleans())
def test_what_is_written_reads_back_as_json_dumps_would_have_it(value: Any, allow_nan: bool) -> None:
    try:
        expected = json.dumps(value, separators=(",", ":"), allow_nan=allow_nan)
    except ValueError:  # NaN where it is not allowed: refused the same way
        with pytest.raises(ValueError):
            compact_json(value, allow_nan=allow_nan)
        return
    text = compact_json(value, allow_nan=allow_nan)
    assert _same(json.loads(text), json.loads(expected)), (text, expected)


def test_a_run_record_is_compact_and_keeps_its_numbers() -> None:
    record = {"token": 1796251376232702, "node_id": "n-1", "claimed_at": 1796251376.2327,
              "result": {"outcome": "ok", "kind": "scheduled", "duration_s": 1.2e-05}}
    text = compact_json(record)
    assert text.startswith('{"token":1796251376232702,"node_id":"n-1","claimed_at":1796251376.2327,')
    assert json.loads(text) == record


@dataclass
class _Point:
    x: int


class _Word(str):
    pass


@pytest.mark.parametrize("value", [datetime(2026, 1, 1, tzinfo=UTC), _Point(1), {"at": _Point(2)}, {1: "a"},
                                   [_Word("w")], 2 ** 80, "half \ud800 a pair"])
def test_what_orjson_would_take_its_own_way_is_left_to_json_dumps(value: Any) -> None:
    """Dates and dataclasses refused (TypeError) as ``json.dumps`` refuses them, not written as orjson would;
    integer keys, str subclasses, big integers and lone surrogates written as ``json.dumps`` writes them."""
    try:
        expected = json.dumps(value, separators=(",", ":"))
    except TypeError:
        with pytest.raises(TypeError):
            compact_json(value)
        return
    assert compact_json(value) == expected


def test_nan_is_written_as_nan_or_refused_never_turned_into_null() -> None:
    assert json.loads(compact_json({"x": math.nan, "y": [math.inf]}))["y"] == [math.inf]
    with pytest.raises(ValueError):
        compact_json({"x": -math.inf}, allow_nan=False)
    with pytest.raises(ValueError):
        compact_json({"result": None, "deep": [{"x": math.nan}]}, allow_nan=False)
    assert compact_json({"result": None, "x": [math.nan]}) == '{"result":null,"x":[NaN]}'


def test_a_null_without_a_nan_beside_it_is_written_by_orjson() -> None:
    """An intent's ``"result": null`` (one per claim) takes orjson's way, not a second pass by ``json.dumps``:
    orjson's form shows in the non-ASCII text, which ``json.dumps`` would escape."""
    assert compact_json(None) == "null"
    assert compact_json({"result": None, "node_id": "nœud", "at": 1.5}) == '{"result":null,"node_id":"nœud","at":1.5}'
