"""Registration rules of the full APScheduler 3 trigger set (node.triggers, node.jobs): no process, no store.

Every node must compute the same fire times; what would make them disagree,
or fail only at node start, is refused when the job is registered, with a
``JobSpecError`` naming the job and the field.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from apscheduler.triggers.date import DateTrigger

from node.jobs import INTERVAL_EPOCH, JobRegistry, JobSpec, RunContext, fire_times
from node.triggers import JobSpecError, OnceTrigger

BERLIN = ZoneInfo("Europe/Berlin")


async def body(run: RunContext) -> None:
    return None


def trigger_of(jobs: JobRegistry, job_id: str, tz: Any = UTC) -> Any:
    return jobs.specs[job_id].make_trigger(tz)


def times(trigger: Any, start: datetime, n: int) -> list[datetime]:
    return fire_times(trigger, start, start + timedelta(days=400), limit=n)


# -- cron -------------------------------------------------------------------------------------


def test_cron_fields_and_a_crontab_string_give_the_same_fire_times() -> None:
    jobs = JobRegistry()
    jobs.cron("fields", minute=0, hour=3, day_of_week="mon-fri")(body)
    jobs.cron("crontab", crontab="0 3 * * mon-fri")(body)
    start = datetime(2026, 12, 1, tzinfo=UTC)  # a Tuesday
    assert times(trigger_of(jobs, "fields"), start, 10) == times(trigger_of(jobs, "crontab"), start, 10)


def test_crontab_weekday_numbers_follow_cron_0_and_7_are_sunday() -> None:
    """APScheduler 3's from_crontab reads 0 as Monday; a crontab user means Sunday."""
    jobs = JobRegistry()
    jobs.cron("weekdays", crontab="30 6 * * 1-5")(body)
    jobs.cron("sunday", crontab="0 0 * * 0")(body)
    jobs.cron("sunday7", crontab="0 0 * * 7")(body)
    jobs.cron("every-other", crontab="0 0 * * */2")(body)
    start = datetime(2026, 11, 30, tzinfo=UTC)  # a Monday
    assert {t.strftime("%a") for t in times(trigger_of(jobs, "weekdays"), start, 20)} == {
        "Mon", "Tue", "Wed", "Thu", "Fri"}
    assert {t.strftime("%a") for t in times(trigger_of(jobs, "sunday"), start, 5)} == {"Sun"}
    assert {t.strftime("%a") for t in times(trigger_of(jobs, "sunday7"), start, 5)} == {"Sun"}
    assert {t.strftime("%a") for t in times(trigger_of(jobs, "every-other"), start, 20)} == {
        "Sun", "Tue", "Thu", "Sat"}


def test_a_per_job_timezone_wins_over_the_nodes_and_cron_tz_in_a_crontab_is_read() -> None:
    jobs = JobRegistry()
    jobs.cron("berlin", hour=3, minute=0, timezone="Europe/Berlin")(body)
    jobs.cron("crontab-tz", crontab="CRON_TZ=Europe/Berlin 0 3 * * *")(body)
    jobs.cron("node-zone", hour=3, minute=0)(body)
    start = datetime(2026, 12, 1, tzinfo=UTC)
    node_tz = ZoneInfo("Asia/Tokyo")
    berlin = times(trigger_of(jobs, "berlin", node_tz), start, 1)[0]
    assert berlin.astimezone(UTC) == datetime(2026, 12, 1, 2, 0, tzinfo=UTC)  # 03:00 CET
    assert times(trigger_of(jobs, "crontab-tz", node_tz), start, 1)[0] == berlin
    # without its own zone a job follows BATON_TIMEZONE (here Tokyo): 03:00 JST is 18:00 UTC the day before
    assert times(trigger_of(jobs, "node-zone", node_tz), start, 1)[0].astimezone(UTC).hour == 18


# -- interval ----------------------------------------------------------------------------------


def test_interval_takes_every_unit_and_counts_from_the_fixed_epoch() -> None:
    jobs = JobRegistry()
    jobs.interval("hourly", hours=1)(body)
    jobs.interval("mixed", weeks=1, days=1, hours=1, minutes=1, seconds=1)(body)
    start = datetime(2026, 12, 1, 10, 17, 3, tzinfo=UTC)
    hourly = times(trigger_of(jobs, "hourly"), start, 3)
    assert hourly == [datetime(2026, 12, 1, h, tzinfo=UTC) for h in (11, 12, 13)]
    step = timedelta(weeks=1, days=1, hours=1, minutes=1, seconds=1)
    first = times(trigger_of(jobs, "mixed"), start, 1)[0]
    assert (first - INTERVAL_EPOCH) % step == timedelta(0)
    # two nodes building the trigger at different instants agree (the anchor is not "now")
    again = JobRegistry()
    again.interval("hourly", hours=1)(body)
    assert times(trigger_of(again, "hourly"), start, 3) == hourly


def test_interval_start_and_end_dates_bound_the_fire_times() -> None:
    jobs = JobRegistry()
    jobs.interval("bounded", minutes=10, start_date="2026-12-01T00:05:00+00:00",
                  end_date=datetime(2026, 12, 1, 0, 35, tzinfo=UTC))(body)
    got = fire_times(trigger_of(jobs, "bounded"), datetime(2026, 11, 30, tzinfo=UTC),
                     datetime(2026, 12, 2, tzinfo=UTC))
    assert [t.minute for t in got] == [5, 15, 25, 35]


# -- date (one-shot) ----------------------------------------------------------------------------


def test_a_date_job_is_a_one_shot_that_is_never_due_once_past() -> None:
    jobs = JobRegistry()
    run_date = datetime(2026, 12, 1, 3, 0, tzinfo=UTC)
    jobs.date("once", run_date=run_date)(body)
    trigger = trigger_of(jobs, "once")
    assert isinstance(trigger, OnceTrigger)
    assert trigger.get_next_fire_time(None, run_date - timedelta(hours=1)) == run_date
    assert trigger.get_next_fire_time(None, run_date + timedelta(seconds=1)) is None  # realign, resume
    assert trigger.get_next_fire_time(run_date, run_date) is None
    # a catch-up looking at a gap finds it only when the gap holds it
    assert fire_times(trigger, run_date - timedelta(minutes=1), run_date + timedelta(minutes=1)) == [run_date]
    assert fire_times(trigger, run_date + timedelta(seconds=1), run_date + timedelta(minutes=1)) == []


def test_a_naive_run_date_is_read_in_the_jobs_zone() -> None:
    jobs = JobRegistry()
    jobs.date("local", run_date="2026-12-01T03:00:00", timezone="Europe/Berlin")(body)
    assert trigger_of(jobs, "local").run_date.astimezone(UTC) == datetime(2026, 12, 1, 2, 0, tzinfo=UTC)


def test_a_hand_built_date_trigger_lists_no_past_fire_time() -> None:
    """fire_times() must not take APScheduler's DateTrigger at its word for a gap after its date."""
    t = datetime(2026, 12, 1, tzinfo=UTC)
    assert fire_times(DateTrigger(run_date=t, timezone=UTC), t + timedelta(seconds=1), t + timedelta(hours=1)) == []


# -- options and defaults -----------------------------------------------------------------------


def test_options_reach_the_spec_and_registry_defaults_apply_like_job_defaults() -> None:
    defaults = {"max_instances": 3, "coalesce": False, "misfire_grace_time": 300, "replace_existing": True}
    jobs = JobRegistry(job_defaults=defaults)
    jobs.cron("a", minute="*/5", recover=True)(body)
    jobs.interval("b", seconds=30, max_instances=1, coalesce=True, misfire_grace_time=20)(body)
    jobs.date("c", run_date="2030-01-01T00:00:00+00:00", misfire_grace=45)(body)
    a, b, c = jobs.specs["a"], jobs.specs["b"], jobs.specs["c"]
    assert (a.max_instances, a.coalesce, a.misfire_grace, a.recover) == (3, False, 300.0, True)
    assert (b.max_instances, b.coalesce, b.misfire_grace) == (1, True, 20.0)
    assert c.misfire_grace == 45.0
    plain = JobRegistry()
    plain.interval("d", seconds=5)(body)
    d = plain.specs["d"]
    assert (d.max_instances, d.coalesce, d.misfire_grace) == (1, True, None)  # None: BATON_MISFIRE_GRACE


def test_add_job_mirrors_apschedulers_add_job_with_args() -> None:
    jobs = JobRegistry(job_defaults={"max_instances": 1, "coalesce": True, "misfire_grace_time": 300,
                                     "replace_existing": True})
    seen: list[Any] = []

    def sync_tenant(tenant: int, full: bool = False) -> int:
        seen.append((tenant, full))
        return tenant

    spec = jobs.add_job(sync_tenant, "interval", id="sync-42", minutes=5, args=[42], kwargs={"full": True})
    assert not spec.is_async
    assert spec.func(None) == 42 and seen == [(42, True)]  # type: ignore[arg-type]
    with pytest.raises(JobSpecError) as err:
        jobs.add_job(sync_tenant, "interval", id="sync-x", minutes=5, args=[1, 2, 3])
    assert err.value.field == "args"


def test_replace_existing_false_refuses_a_second_registration() -> None:
    jobs = JobRegistry(job_defaults={"replace_existing": False})
    jobs.interval("once", seconds=5)(body)
    with pytest.raises(JobSpecError) as err:
        jobs.interval("once", seconds=10)(body)
    assert (err.value.job_id, err.value.field) == ("once", "id")
    replacing = JobRegistry()
    replacing.interval("x", seconds=5)(body)
    replacing.interval("x", seconds=10)(body)
    assert str(replacing.specs["x"].make_trigger(UTC)) == "interval[0:00:10]"


BAD: list[tuple[str, dict[str, Any], str, str]] = [
    ("cron", {"hour": 3, "jitter": 30}, "jitter", "disagree"),
    ("interval", {"seconds": 5, "jitter": 2}, "jitter", "disagree"),
    ("cron", {"hour": 3, "timezone": "Europe/Berlin", "tz": "UTC"}, "tz", "unknown field"),
    ("cron", {"crontab": "CRON_TZ=UTC 0 3 * * *", "timezone": "Europe/Berlin"}, "timezone", "given twice"),
    ("cron", {"hour": 3, "misfire_grace": 5, "misfire_grace_time": 6}, "misfire_grace", "given twice"),
    ("cron", {"hourz": 3}, "hourz", "did you mean 'hour'"),
    ("cron", {"hour": "25"}, "hour", "hour"),
    ("cron", {"crontab": "0 3 * *"}, "crontab", "5"),
    ("cron", {"crontab": "0 3 * * *", "hour": 4}, "hour", "either crontab or"),
    ("cron", {"crontab": "0 3 * * 9"}, "crontab", "0-7"),
    ("cron", {}, "cron", "at least one"),
    ("cron", {"minute": 5, "seconds": 5}, "seconds", "belongs to interval"),
    ("cron", {"minute": 5, "timezone": "Mars/Olympus"}, "timezone", "IANA"),
    ("interval", {}, "seconds", "positive length"),
    ("interval", {"seconds": 0}, "seconds", "positive length"),
    ("interval", {"hours": -1}, "hours", "0 or more"),
    ("interval", {"seconds": True}, "seconds", "not a number"),
    ("interval", {"seconds": 5, "start_date": "yesterday"}, "start_date", "ISO 8601"),
    ("interval", {"seconds": 5, "start_date": "2026-12-02T00:00:00+00:00", "end_date": "2026-12-01T00:00:00+00:00"},
     "end_date", "not after"),
    ("interval", {"seconds": 5, "next_run_time": "2026-12-01T00:00:00+00:00"}, "next_run_time", "refused"),
    ("date", {}, "run_date", "needs run_date"),
    ("date", {"run_date": "2030-01-01T00:00:00+00:00", "hour": 3}, "hour", "belongs to cron"),
    ("interval", {"seconds": 5, "max_instances": 0}, "max_instances", "1 or more"),
    ("interval", {"seconds": 5, "coalesce": "yes"}, "coalesce", "true or false"),
    ("interval", {"seconds": 5, "misfire_grace_time": None}, "misfire_grace_time", "no limit"),
    ("interval", {"seconds": 5, "misfire_grace_time": -1}, "misfire_grace_time", "positive"),
    ("sometimes", {"seconds": 5}, "trigger", "not a trigger"),
]


@pytest.mark.parametrize(("kind", "given", "field", "words"), BAD, ids=[f"{k}-{f}-{w}" for k, _, f, w in BAD])
def test_bad_combinations_are_refused_at_registration_naming_job_and_field(
        kind: str, given: dict[str, Any], field: str, words: str) -> None:
    jobs = JobRegistry()
    with pytest.raises(JobSpecError) as err:
        if kind in ("cron", "interval", "date"):
            getattr(jobs, kind)("the-job", **given)  # the decorator's line, before any function
        else:
            jobs.add_job(body, kind, id="the-job", **given)
    assert err.value.job_id == "the-job"
    assert err.value.field == field
    assert words in str(err.value)
    assert "the-job" in str(err.value) and field in str(err.value)
    assert not jobs.specs


@pytest.mark.parametrize("job_id", ["", "has space", "a@b", "a#b", "a/b", "x" * 201])
def test_job_ids_that_would_break_claim_keys_or_paths_are_refused(job_id: str) -> None:
    with pytest.raises(JobSpecError) as err:
        JobRegistry().interval(job_id, seconds=1)(body)
    assert err.value.field == "id"


def test_unknown_job_defaults_are_refused() -> None:
    with pytest.raises(JobSpecError) as err:
        JobRegistry(job_defaults={"max_instance": 2})
    assert err.value.field == "max_instance" and "max_instances" in str(err.value)


def test_a_hand_built_spec_with_jitter_is_refused() -> None:
    from apscheduler.triggers.interval import IntervalTrigger

    jobs = JobRegistry()
    with pytest.raises(JobSpecError) as err:
        jobs.add(JobSpec("jittery", body, lambda tz: IntervalTrigger(seconds=5, jitter=1, timezone=tz)))
    assert err.value.field == "jitter"


def test_registered_jobs_start_on_a_node() -> None:
    """What registers builds its trigger in any zone: nothing fails later at node start (the old cron
    decorator took ``timezone=`` and then failed at start with a duplicate keyword)."""
    jobs = JobRegistry()
    jobs.cron("tz", hour=3, timezone="Europe/Berlin")(body)
    jobs.cron("tab", crontab="0 3 * * mon-fri", start_date="2026-01-01T00:00:00", end_date="2027-01-01T00:00:00")(body)
    jobs.interval("iv", hours=1, timezone=BERLIN)(body)
    jobs.date("once", run_date="2030-01-01T00:00:00")(body)
    for spec in jobs:
        for tz in (UTC, BERLIN, ZoneInfo("America/New_York")):
            assert spec.make_trigger(tz) is not None
