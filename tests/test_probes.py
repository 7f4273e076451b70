"""Probes during an outage hold or an account pause, and how sends resume after one.

Store-level, on a Redis of this module's own, with no worker: each test moves deliveries
on itself through the real step script (``Store.step`` with ``Finish`` items built from
its claims and ``policy.judge`` verdicts, as a drain does), playing the provider by the
answers it records. Time passes only through the keys the scripts read: a probe's wait
runs out by shortening ``bf:paused`` to 1 ms, and a long hold or pause is one whose start
(``bf:outage``, ``bf:before``) is moved back; nothing sleeps for a probe wait.

What is asserted is what the claims return (which delivery probes, how many are granted
and with what reserved wait), never a measured rate.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import pytest

from tests.conftest import unique
from tests.helpers import wait_for
from worker.deliver.policy import AnswerClass, OutageRules, RetryRules, judge
from worker.deliver.provider import Answer
from worker.deliver.steps import Claim, Finish, StepResult
from worker.enqueue.record import BackfillRecord
from worker.state import keys
from worker.state.store import Store

# Holds begin on 3 failures of 3 deliveries (no retry among them needed); the ramp starts
# at 4/s (a slot every 250 ms) and doubles every 2 s; up to 20 s is a short hold or pause.
RULES = OutageRules(
    failures=3, deliveries=3, retried=0, ramp_start_per_s=4.0, ramp_double_s=2.0, short_s=20.0
)
PAUSE_S = 60.0  # a pause's probe waits 1 s, then twice as long each time one is refused
RETRY = RetryRules(max_attempts=16, pause_s=PAUSE_S)
MAX_WAIT_S = 5.0  # the step's max_wait_s: during the ramp, half a doubling (1 s) bounds it
WANT = 16  # deliveries asked for by the claim after a hold or pause ends

OK = Answer(AnswerClass.SUCCESS, http_status=200, api_status="0", api_reason="success")
DOWN = Answer(AnswerClass.TRANSIENT, http_status=503, error="HTTP 503")
BLOCKED = Answer(AnswerClass.BLOCKED, http_status=200, api_status="-13", api_reason="blocked")

# What a hold or a pause leaves in Redis while it lasts; none of it once an answer ends it.
FLEET_STOP_KEYS = (
    keys.OUTAGE, keys.OUTAGE_LAST, keys.OUTAGE_SEEN, keys.PAUSED, keys.PROBE, keys.PROBE_LOCK,
    keys.BEFORE, keys.HELD_BY,
)  # fmt: skip


@pytest.fixture
def store_options() -> dict[str, Any]:
    """``store`` holds and ramps by RULES, and pauses up to PAUSE_S."""
    return {"outage": RULES, "pause_s": PAUSE_S}


def records(app: str, count: int) -> list[BackfillRecord]:
    return [
        BackfillRecord(app, f"8613{i:09d}", str(1_700_000_000_000 + i), msgid=unique(app))
        for i in range(count)
    ]


def enqueue(store: Store, app: str, count: int) -> list[str]:
    """``count`` new live deliveries of ``app``, due now; their ids."""
    return [i for i, _ in store.enqueue_many(records(app, count), lane="l")]


def step(store: Store, done: Sequence[Finish] = (), claim: int = 0) -> StepResult:
    return store.step(
        list(done), claim=claim, prefer_bulk=False, lease_s=30, max_attempts=RETRY.max_attempts,
        max_wait_s=MAX_WAIT_S,
    )  # fmt: skip


def answered(claim: Claim, answer: Answer, *, holding: bool = False) -> Finish:
    """The attempt of ``claim`` met ``answer``: judged as a drain judges it."""
    return Finish(claim, answer, judge(answer, claim.attempts, RETRY, holding=holding))


def now_ms(store: Store) -> int:
    """Redis's clock, which the scripts read."""
    seconds, micros = store.redis.time()
    return int(seconds) * 1000 + int(micros) // 1000


def first_due(store: Store, among: Sequence[str]) -> str:
    """The earliest due of ``among`` in the live lane's order (due time, then id).

    A failure recorded during a hold is due again when the hold's pause ends; those that
    began it, after its first pause of 1 ms, or after 1 s when the step took longer than
    that 1 ms (Redis 7.0 reads the TTL live inside a script): the tests expect either.
    """
    due = [str(i) for i in store.redis.zrangebyscore(keys.LIVE, "-inf", now_ms(store))]
    return next(i for i in due if i in among)


def run_out_the_wait(store: Store) -> None:
    """The wait before the next probe has passed: the pause (a hold's or an account's)
    ends now, as its TTL would end it."""
    store.redis.pexpire(keys.PAUSED, 1)
    wait_for(lambda: not store.redis.exists(keys.PAUSED), timeout_s=10, every_s=0.002)


def probe(store: Store) -> Claim:
    """Claim the one probe the fleet sends: asked for many, one is granted, and no other
    claim is granted while it is out."""
    result = step(store, claim=8)
    assert (len(result.claims), result.status) == (1, "full"), result
    again = step(store, claim=8)
    assert (again.claims, again.status) == ([], "probing")
    return result.claims[0]


def deliver(store: Store, count: int) -> None:
    """Traffic before a hold or pause: ``count`` deliveries claimed and delivered now."""
    enqueue(store, "app-w", count)
    done: list[Finish] = []
    delivered = 0
    while True:
        result = step(store, done, claim=64)
        delivered += sum(verdict == "delivered" for verdict, _ in result.recorded)
        if not result.claims:
            break
        done = [answered(c, OK) for c in result.claims]
    assert delivered == count


def begin_hold(store: Store, ids: Sequence[str]) -> None:
    """The provider fails ``ids`` (claimed together, recorded in this order): the fleet
    holds, and the last of them is the delivery that failed last."""
    claims = {c.delivery_id: c for c in step(store, claim=len(ids)).claims}
    assert sorted(claims) == sorted(ids)
    held = step(store, [answered(claims[i], DOWN) for i in ids])
    assert held.outage
    assert held.recorded == [("held", False)] * len(ids)
    assert store.redis.get(keys.OUTAGE_LAST) == ids[-1]


def begin_pause(store: Store, ids: Sequence[str]) -> None:
    """The provider answers ``ids`` account-blocked: the fleet pauses (probe in 1 s)."""
    claims = step(store, claim=len(ids)).claims
    paused = step(store, [answered(c, BLOCKED) for c in claims])
    assert paused.recorded[0] == ("paused", True)
    assert store.redis.get(keys.PROBE) == "1000|0"  # the wait, no probe refused yet


@dataclass(frozen=True)
class Stop:
    """A fleet-wide stop that probes and ramps after: an outage hold or an account pause."""

    name: str
    begin: Callable[[Store, Sequence[str]], None]
    refused: Callable[[Claim], Finish]  # a probe's attempt that keeps it
    kept_as: str  # the verdict the step records for that attempt


HOLD = Stop("outage hold", begin_hold, lambda c: answered(c, DOWN, holding=True), "held")
PAUSE = Stop("account pause", begin_pause, lambda c: answered(c, BLOCKED), "paused")
STOPS = pytest.mark.parametrize("stop", [HOLD, PAUSE], ids=lambda s: s.name)


def stopped_after_traffic(store: Store, stop: Stop) -> float:
    """Deliveries flow (200 of them), then ``stop`` begins on 3 deliveries of app-a and
    WANT + 2 of app-b are enqueued; the delivery rate the step noted before it (per s)."""
    deliver(store, 200)
    stop.begin(store, enqueue(store, "app-a", 3))
    enqueue(store, "app-b", WANT + 2)  # enough due for WANT claims after two probes
    began, rate = str(store.redis.get(keys.BEFORE)).split("|")
    assert int(began) <= now_ms(store)
    # 200 deliveries in the 10 to 20 s the 10 s counters span, well above the ramp's start
    assert float(rate) > RULES.ramp_start_per_s
    return float(rate)


def move_start_back(store: Store, by_ms: int) -> None:
    """As if the hold or pause had begun ``by_ms`` earlier: its start moved back where the
    scripts keep it. Whether it was short is read from ``bf:before``'s time (written when
    it began); a hold's ``bf:outage`` start gives only its ``outage_over`` duration."""
    r = store.redis
    began, rate = str(r.get(keys.BEFORE)).split("|")
    r.set(keys.BEFORE, f"{int(began) - by_ms}|{rate}", keepttl=True)
    outage = r.get(keys.OUTAGE)
    if outage is not None:
        start, rest = str(outage).split("|", 1)
        r.set(keys.OUTAGE, f"{int(start) - by_ms}|{rest}")


def end_with_an_answer(store: Store, stop: Stop, refused_first: int) -> StepResult:
    """Probes until one is answered: ``refused_first`` are refused first. The step that
    records the answer claims WANT deliveries, as a drain's next step does."""
    for _ in range(refused_first):
        run_out_the_wait(store)
        kept = step(store, [stop.refused(probe(store))])
        assert [verdict for verdict, _ in kept.recorded] == [stop.kept_as]
    run_out_the_wait(store)
    over = step(store, [answered(probe(store), OK)], claim=WANT)
    assert over.recorded == [("delivered", False)]
    assert not over.outage
    assert [k for k in FLEET_STOP_KEYS if store.redis.exists(k)] == []
    assert (store.outage_state(), store.pause_state()) == (None, None)
    return over


def waits(result: StepResult) -> list[float]:
    """The rate-limit wait reserved for each delivery claimed (s)."""
    return [c.wait_s for c in result.claims]


# -- which delivery probes a hold


def test_probes_take_turns_between_the_delivery_that_failed_last_and_another_apps(
    store: Store,
) -> None:
    a = enqueue(store, "app-a", 3)
    begin_hold(store, a)  # a[2] failed last
    b = enqueue(store, "app-b", 2)
    # app-a's own may wait for the hold's first pause (see first_due): two more, due now
    a += enqueue(store, "app-a", 2)
    probes: list[str] = []
    expected: list[str] = []
    for turn in range(6):
        run_out_the_wait(store)
        if turn % 2 == 0:
            # the delivery that failed last: a[2] first, then each other-app probe again
            expected.append(probes[-1] if probes else a[2])
        else:
            # the earliest due delivery of the other app than the last probe's
            expected.append(first_due(store, b if probes[-1] in a else a))
        claim = probe(store)
        probes.append(claim.delivery_id)
        held = step(store, [HOLD.refused(claim)])  # the outage goes on
        assert held.recorded == [("held", False)]
        assert held.outage
    assert probes == expected
    assert [p in a for p in probes] == [True, False, False, True, True, False]
    # each delivery probed at most twice in a row, and both of app-b's had a turn
    assert probes[1] != probes[5]
    assert set(b) <= set(probes)
    # the probes' failures were the outage's: none of them counted
    assert {store.redis.hget(keys.delivery(i), "c") for i in probes} == {"0"}


def test_a_record_the_provider_always_fails_gets_one_probe_and_another_apps_answer_ends_the_hold(
    store: Store,
) -> None:
    a = enqueue(store, "app-a", 3)
    poison = a[2]
    begin_hold(store, a)  # the poison record failed last
    (other,) = enqueue(store, "app-b", 1)
    run_out_the_wait(store)
    first = probe(store)
    assert first.delivery_id == poison
    assert step(store, [HOLD.refused(first)]).recorded == [("held", False)]
    run_out_the_wait(store)
    second = probe(store)
    assert second.delivery_id == other  # not the poison record again
    over = step(store, [answered(second, OK)])
    assert [e["kind"] for e in over.events] == ["outage_over"]
    assert [k for k in FLEET_STOP_KEYS if store.redis.exists(k)] == []
    # the poison record, and the others whose failures began the hold, are its suspects:
    # their next such failures are their own (counted, no evidence for the fleet)
    assert [store.redis.hget(keys.delivery(i), "g") for i in a] == ["o", "o", "o"]


def test_with_one_app_only_the_other_app_turn_probes_another_delivery_of_the_same_app(
    store: Store,
) -> None:
    a = enqueue(store, "app-a", 3)
    begin_hold(store, a)
    ids = a + enqueue(store, "app-a", 2)
    probes: list[str] = []
    expected: list[str] = []
    for turn in range(4):
        run_out_the_wait(store)
        if turn % 2 == 0:
            expected.append(probes[-1] if probes else a[2])
        else:
            expected.append(first_due(store, [i for i in ids if i != probes[-1]]))
        claim = probe(store)
        probes.append(claim.delivery_id)
        assert step(store, [HOLD.refused(claim)]).recorded == [("held", False)]
    assert probes == expected
    assert probes[1] != probes[0]
    assert probes[3] != probes[2]


# -- how sends resume


@STOPS
def test_a_stop_ended_by_its_first_probe_resumes_with_no_ramp(store: Store, stop: Stop) -> None:
    stopped_after_traffic(store, stop)
    over = end_with_an_answer(store, stop, refused_first=0)
    assert not store.redis.exists(keys.RAMP)
    assert (over.status, waits(over)) == ("full", [0.0] * WANT)


@STOPS
def test_a_short_stop_ended_by_a_later_probe_resumes_at_the_rate_before_it(
    store: Store, stop: Stop
) -> None:
    before = stopped_after_traffic(store, stop)
    over = end_with_an_answer(store, stop, refused_first=1)
    ramp = str(store.redis.get(keys.RAMP))
    assert float(ramp.split("|")[1]) == before
    # a slot every 1 / before s (the rate clock keeps 0.1 ms), reserved up to half a
    # doubling (1 s) ahead: more than the ramp's start (4/s: 5 slots in that 1 s) grants
    reserved = waits(over)
    assert reserved[0] == 0.0
    assert len(reserved) > 5
    gaps = [later - earlier for earlier, later in pairwise(reserved)]
    assert gaps == pytest.approx([1 / before] * len(gaps), abs=2e-4)
    if over.status == "throttled":  # the next slot lies past the 1 s
        assert over.resume_in_s == pytest.approx(len(reserved) / before, abs=5e-3)
    else:
        assert (over.status, len(reserved)) == ("full", WANT)


@STOPS
def test_a_stop_longer_than_the_short_limit_resumes_at_the_ramps_start(
    store: Store, stop: Stop
) -> None:
    stopped_after_traffic(store, stop)
    move_start_back(store, int(RULES.short_s * 1000) + 1000)
    over = end_with_an_answer(store, stop, refused_first=1)
    assert float(str(store.redis.get(keys.RAMP)).split("|")[1]) == RULES.ramp_start_per_s
    # 4/s: a slot every 250 ms, reserved up to half a doubling (1 s) ahead, then throttled
    assert waits(over) == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert (over.status, over.resume_in_s) == ("throttled", 1.25)
    if stop is HOLD:
        (event,) = over.events
        assert event["kind"] == "outage_over"
        assert json.loads(event["detail"])["duration_ms"] > RULES.short_s * 1000


# -- answers of attempts that were in flight when a pause began, and a 1 s pause


def pause_with_one_more_in_flight(store: Store) -> None:
    """Two attempts in flight are answered account-blocked, each recorded by its own step
    (two lanes or workers): the first begins the pause, the second lands during it."""
    deliver(store, 200)
    enqueue(store, "app-a", 2)
    first, second = step(store, claim=2).claims
    enqueue(store, "app-b", WANT + 2)
    assert step(store, [answered(first, BLOCKED)]).recorded == [("paused", True)]
    assert step(store, [answered(second, BLOCKED)]).recorded == [("paused", False)]


def test_a_pause_ended_by_its_first_probe_resumes_with_no_ramp_after_answers_in_flight(
    store: Store,
) -> None:
    pause_with_one_more_in_flight(store)
    over = end_with_an_answer(store, PAUSE, refused_first=0)
    assert not store.redis.exists(keys.RAMP)
    assert (over.status, waits(over)) == ("full", [0.0] * WANT)


def test_a_pause_whose_first_probe_is_refused_probes_again_in_2_s_after_answers_in_flight(
    store: Store,
) -> None:
    pause_with_one_more_in_flight(store)
    run_out_the_wait(store)
    refused = step(store, [PAUSE.refused(probe(store))])
    assert [verdict for verdict, _ in refused.recorded] == ["paused"]
    assert store.redis.get(keys.PROBE) == "2000|1"  # the wait, and one probe refused
    assert 0 < store.redis.pttl(keys.PAUSED) <= 2000


@pytest.mark.parametrize("store_options", [{"outage": RULES, "pause_s": 1.0}])
def test_a_long_pause_with_pause_s_of_1_s_resumes_at_the_ramps_start(store: Store) -> None:
    stopped_after_traffic(store, PAUSE)
    move_start_back(store, int(RULES.short_s * 1000) + 1000)
    over = end_with_an_answer(store, PAUSE, refused_first=2)
    ramp = store.redis.get(keys.RAMP)
    assert ramp is not None  # two probes were refused: not a false alarm
    assert float(str(ramp).split("|")[1]) == RULES.ramp_start_per_s
    assert waits(over) == [0.0, 0.25, 0.5, 0.75, 1.0]


def test_a_failure_in_flight_when_a_hold_began_leaves_the_first_probe_at_once(
    store: Store,
) -> None:
    """The hold's first probe goes at once; a failure of an attempt that was in flight
    when the hold began, recorded after that moment and before any probe, is not a
    refused probe: the wait stays, and the next claim is the probe, granted now."""
    enqueue(store, "app-a", 4)
    claims = step(store, claim=4).claims
    late = claims[-1]
    held = step(store, [answered(c, DOWN) for c in claims[:-1]])
    assert held.outage
    run_out_the_wait(store)  # the 1 ms before the first probe has passed: its turn
    kept = step(store, [answered(late, DOWN, holding=True)])
    assert kept.recorded == [("held", False)]
    _start, wait, probes = str(store.redis.get(keys.OUTAGE)).split("|")
    assert (wait, probes) == ("1", "0")  # no probe was refused: the wait did not double
    assert not store.redis.exists(keys.PAUSED)
    first = probe(store)  # granted at once
    assert first.attempts >= 1
