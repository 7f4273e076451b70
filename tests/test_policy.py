"""Status-code classes and backoff delays (pure functions)."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest

from worker.deliver.policy import (
    RELEASE,
    AnswerClass,
    Evidence,
    Outcome,
    RetryRules,
    Verdict,
    backoff_ceiling,
    classify_code,
    classify_http,
    decide,
    judge,
    parse_code_table,
    retry_delay,
    retry_window,
)


@pytest.mark.parametrize(
    ("codes", "kind"),
    [
        (["0"], AnswerClass.SUCCESS),
        (["-20"], AnswerClass.DUPLICATE),
        (["-12", "-15", "-16", "-18", "-23", "-27", "-28", "-99", "7"], AnswerClass.TRANSIENT),
        (["-9", "-11", "-14", "-21", "-22", "-24", "-25"], AnswerClass.BAD_RECORD),
        (["-1", "-2", "-10", "-13", "-29", "-30", "-31", "-32"], AnswerClass.BLOCKED),
    ],
)
def test_the_spec_code_table(codes: list[str], kind: AnswerClass) -> None:
    assert {classify_code(c) for c in codes} == {kind}


@pytest.mark.parametrize(
    ("http", "kind"),
    [
        (200, None),
        (500, AnswerClass.TRANSIENT),
        (503, AnswerClass.TRANSIENT),
        (408, AnswerClass.TRANSIENT),
        (429, AnswerClass.TRANSIENT),
        (400, AnswerClass.BAD_RECORD),
        (404, AnswerClass.BAD_RECORD),
        (302, AnswerClass.TRANSIENT),
    ],
)
def test_http_status_classes(http: int, kind: AnswerClass | None) -> None:
    assert classify_http(http) == kind


def test_backoff_ceiling_doubles_up_to_the_cap() -> None:
    assert [backoff_ceiling(n, 2, 1800) for n in (1, 2, 3, 10, 11, 16)] == [
        2,
        4,
        8,
        1024,
        1800,
        1800,
    ]
    assert backoff_ceiling(10_000, 2, 1800) == 1800


def test_full_jitter_stays_within_zero_and_the_ceiling() -> None:
    rng = random.Random(1)
    delays = [retry_delay(3, 2, 1800, rng=rng) for _ in range(2000)]
    assert min(delays) >= 0
    assert max(delays) <= 8
    assert max(delays) > 7  # the whole range is used, not just its top
    assert min(delays) < 1


def test_retry_after_is_a_floor_within_the_cap() -> None:
    rng = random.Random(2)
    assert all(retry_delay(1, 2, 1800, 30, rng) >= 30 for _ in range(100))
    assert retry_delay(1, 2, 10, 3600, rng) == 10


def test_default_retry_window_is_about_three_hours() -> None:
    assert 3 * 3600 - 600 < retry_window(16, 2, 1800) < 3 * 3600 + 600


def test_decide_maps_classes_to_outcomes() -> None:
    assert decide(AnswerClass.SUCCESS, 1, 16, 2, 1800) == (Outcome.DELIVERED, None)
    assert decide(AnswerClass.DUPLICATE, 1, 16, 2, 1800) == (Outcome.DUPLICATE, None)
    assert decide(AnswerClass.BLOCKED, 16, 16, 2, 1800) == (Outcome.PAUSED, None)
    assert decide(AnswerClass.BAD_RECORD, 1, 16, 2, 1800) == (Outcome.DEAD, None)
    assert decide(AnswerClass.TRANSIENT, 16, 16, 2, 1800) == (Outcome.DEAD, None)
    outcome, delay = decide(AnswerClass.TRANSIENT, 15, 16, 2, 1800)
    assert outcome is Outcome.RETRY
    assert delay is not None
    assert 0 <= delay <= 1800


def test_code_table_overrides_parse_and_reject_nonsense() -> None:
    assert parse_code_table("-16:bad_record, -99:transient") == {
        "-16": AnswerClass.BAD_RECORD,
        "-99": AnswerClass.TRANSIENT,
    }
    with pytest.raises(ValueError, match="unknown class"):
        parse_code_table("-16:fatal")
    with pytest.raises(ValueError, match="CODE:CLASS"):
        parse_code_table("sixteen")


RULES = RetryRules(max_attempts=3, backoff_base_s=1, backoff_cap_s=8, pause_s=60, slowdown_s=2)


@dataclass(frozen=True)
class _Answer:
    kind: AnswerClass
    http_status: int | None = 200
    api_status: str | None = None
    error: str | None = None
    retry_after_s: float | None = None


def test_one_verdict_says_everything_an_answer_decides() -> None:
    ok = judge(_Answer(AnswerClass.SUCCESS, api_status="0"), 1, RULES)
    assert ok == Verdict(Outcome.DELIVERED, evidence=Evidence.UP)
    busy = judge(_Answer(AnswerClass.TRANSIENT, api_status="-18"), 1, RULES, rng=random.Random(1))
    assert busy.outcome is Outcome.RETRY
    assert busy.counted
    assert 0 <= (busy.retry_in_s or 0) <= 1
    assert busy.evidence is Evidence.UP
    assert busy.hold_s == 0
    # "too frequent": a retry, and the whole fleet holds for slowdown_s
    fast = judge(_Answer(AnswerClass.TRANSIENT, api_status="-27"), 1, RULES)
    assert fast.hold_s == 2
    # the last attempt's transient failure is dead
    assert judge(_Answer(AnswerClass.TRANSIENT, api_status="-18"), 3, RULES).outcome is Outcome.DEAD
    # account blocked: the fleet pauses for pause_s, the attempt gives its count back
    blocked = judge(_Answer(AnswerClass.BLOCKED, api_status="-2"), 1, RULES)
    assert blocked == Verdict(Outcome.PAUSED, 60, counted=False, evidence=Evidence.UP)
    # a 503 points at the provider: counted as usual, unless the fleet holds for an outage
    down = _Answer(AnswerClass.TRANSIENT, http_status=503, error="HTTP 503")
    assert judge(down, 1, RULES).evidence is Evidence.DOWN
    assert judge(down, 1, RULES).counted
    held = judge(down, 3, RULES, holding=True)
    assert held == Verdict(Outcome.PAUSED, None, counted=False, evidence=Evidence.DOWN)
    # holding changes nothing for an answer from the provider itself
    busy_last = judge(_Answer(AnswerClass.TRANSIENT, api_status="-18"), 3, RULES, holding=True)
    assert busy_last.outcome is Outcome.DEAD
    assert RELEASE.released
    assert not RELEASE.counted


def test_a_block_or_redirect_while_another_record_was_accepted_is_the_records_own() -> None:
    redirect = _Answer(AnswerClass.BLOCKED, http_status=302, error="HTTP 302 redirect")
    blocked = _Answer(AnswerClass.BLOCKED, api_status="-2")
    for answer in (redirect, blocked):
        assert judge(answer, 1, RULES).outcome is Outcome.PAUSED
        # merely answered (another record's -18, or its block) proves nothing of this one
        assert judge(answer, 1, RULES, answered_meanwhile=True).outcome is Outcome.PAUSED
        own = judge(answer, 1, RULES, accepted_meanwhile=True, rng=random.Random(1))
        assert own.outcome is Outcome.RETRY
        assert own.counted
        assert own.hold_s == 0
        assert own.evidence is Evidence.OWN_BLOCK  # the step marks it a pause suspect
        assert judge(answer, 3, RULES, accepted_meanwhile=True).outcome is Outcome.DEAD
