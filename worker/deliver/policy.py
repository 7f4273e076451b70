"""What an answer means and what follows from it (pure): status-code classes, backoff,
the outage evidence, and ``judge``, which turns one attempt's answer into one ``Verdict``
that the store records as it is. The one place to change a retry decision."""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol


class AnswerClass(StrEnum):
    """The SPEC section 1 classes of a provider answer."""

    SUCCESS = "success"
    DUPLICATE = "duplicate"
    TRANSIENT = "transient"
    BAD_RECORD = "bad_record"
    BLOCKED = "blocked"


class Outcome(StrEnum):
    """The audit outcome of one attempt (SPEC section 4)."""

    DELIVERED = "delivered"
    DUPLICATE = "duplicate"
    RETRY = "retry"
    DEAD = "dead"
    PAUSED = "paused"


# The provider's published code table; unknown codes are transient (SPEC section 1).
DEFAULT_CODE_CLASSES: Mapping[str, AnswerClass] = {
    "0": AnswerClass.SUCCESS,
    "-20": AnswerClass.DUPLICATE,
    **dict.fromkeys(("-12", "-15", "-16", "-18", "-23", "-27", "-28"), AnswerClass.TRANSIENT),
    **dict.fromkeys(("-9", "-11", "-14", "-21", "-22", "-24", "-25"), AnswerClass.BAD_RECORD),
    **dict.fromkeys(("-1", "-2", "-10", "-13", "-29", "-30", "-31", "-32"), AnswerClass.BLOCKED),
}

# Provider codes that mean "you are sending too fast": the whole fleet slows down.
SLOWDOWN_CODES = frozenset({"-15", "-27", "-28"})

# HTTP statuses that say "try again later" rather than "this request is wrong".
TRANSIENT_HTTP = frozenset({408, 429})


# Transport errors that say "the provider (or the way to it) is down", by their prefix.
_DOWN_ERRORS = ("connection error", "tls error", "timeout", "deadline exceeded", "transport error")


# Provider codes that blame our clock, not the record: "timestamp expired". The whole
# fleet signs with the same (corrected) clock, so a run of them holds it like an outage.
CLOCK_CODES = frozenset({"-16"})


class Evidence(StrEnum):
    """What one attempt says about the provider itself (the outage detector's input)."""

    DOWN = "1"  # no answer, HTTP 5xx/429/408, or our clock refused: not the record's fault
    UP = "0"  # the provider answered (any status code, any 4xx): it is up
    NONE = "-"  # says nothing either way (never sent, a redirect, an unreadable body)
    # it would point at the provider, but the provider answered other deliveries while this
    # attempt was in flight: the record's own trouble (the step marks it a suspect)
    OWN = "s"
    # an account-blocked answer or a redirect while the provider accepted other deliveries:
    # the record's own (the step marks it a pause suspect, so it never pauses the fleet)
    OWN_BLOCK = "b"
    # DOWN, and the provider asked us to wait (Retry-After): its retry is never hurried
    WAIT = "w"

    @property
    def down(self) -> bool:
        """Whether it points at the provider (with or without a Retry-After)."""
        return self in (Evidence.DOWN, Evidence.WAIT)


def outage_evidence(http_status: int | None, api_status: str | None, error: str | None) -> Evidence:
    """Whether an attempt points at a provider outage (or at our clock: ``-16``), proves
    the provider up, or neither."""
    if api_status in CLOCK_CODES:
        return Evidence.DOWN
    if api_status is not None:
        return Evidence.UP
    if http_status is None:
        if error and error.startswith(_DOWN_ERRORS):
            return Evidence.DOWN
        return Evidence.NONE
    if http_status >= 500 or http_status in TRANSIENT_HTTP:
        return Evidence.DOWN
    if 400 <= http_status < 500:
        return Evidence.UP
    return Evidence.NONE


@dataclass(frozen=True, slots=True)
class OutageRules:
    """When failures that point at the provider hold the fleet, and how sends resume."""

    failures: int = 8  # failures in the window (with no answer from the provider between)
    deliveries: int = 3  # ... of at least this many distinct deliveries
    window_s: float = 60.0
    probe_cap_s: float = 60.0  # the probe's wait doubles from 1 s up to this
    ramp_start_per_s: float = 5.0  # after a hold or pause: sends per second at first (0: off)
    ramp_double_s: float = 2.0  # ... doubled this often, until past 256 times the start
    retried: int = 1  # ... and at least this many of them failed a retry too (0: no need)
    short_s: float = 30.0  # a hold or pause this short resumes near the rate before it


def classify_code(
    code: str, table: Mapping[str, AnswerClass] = DEFAULT_CODE_CLASSES
) -> AnswerClass:
    """The class of a provider ``status`` code; codes not in the table are transient."""
    return table.get(code.strip(), AnswerClass.TRANSIENT)


def classify_http(http_status: int) -> AnswerClass | None:
    """The class implied by the HTTP status alone, or None when the body decides (2xx)."""
    if 200 <= http_status < 300:
        return None
    if http_status >= 500 or http_status in TRANSIENT_HTTP:
        return AnswerClass.TRANSIENT
    if 400 <= http_status < 500:
        return AnswerClass.BAD_RECORD
    return AnswerClass.TRANSIENT


def backoff_ceiling(attempt: int, base_s: float, cap_s: float) -> float:
    """The upper bound of the wait after failed attempt ``attempt`` (1-based)."""
    if attempt < 1:
        raise ValueError("attempt is 1-based")
    # 2**60 already dwarfs any cap; bounding the exponent keeps the float finite.
    return float(min(cap_s, base_s * 2 ** min(attempt - 1, 60)))


def retry_delay(
    attempt: int,
    base_s: float,
    cap_s: float,
    retry_after_s: float | None = None,
    rng: random.Random | None = None,
) -> float:
    """Full-jitter backoff: random(0, min(cap, base * 2**(n-1))), Retry-After as a floor."""
    ceiling = backoff_ceiling(attempt, base_s, cap_s)
    delay = (rng or random).uniform(0.0, ceiling)
    if retry_after_s is not None and retry_after_s > 0:
        delay = max(delay, min(retry_after_s, cap_s))
    return delay


def retry_window(max_attempts: int, base_s: float, cap_s: float) -> float:
    """The longest total wait the settings allow between the first and the last attempt."""
    return sum(backoff_ceiling(n, base_s, cap_s) for n in range(1, max_attempts))


def parse_code_table(spec: str) -> dict[str, AnswerClass]:
    """Parse overrides like ``-16:bad_record,-99:transient`` (raises ValueError)."""
    table: dict[str, AnswerClass] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        code, sep, name = item.partition(":")
        if not sep or not code.strip().lstrip("-").isdigit():
            raise ValueError(f"expected CODE:CLASS pairs, got {item!r}")
        try:
            table[code.strip()] = AnswerClass(name.strip())
        except ValueError:
            choices = ", ".join(c.value for c in AnswerClass)
            raise ValueError(f"unknown class {name.strip()!r} (one of {choices})") from None
    return table


class Observed(Protocol):
    """What ``judge`` reads of an attempt's answer (``provider.Answer`` is one)."""

    @property
    def kind(self) -> AnswerClass: ...
    @property
    def http_status(self) -> int | None: ...
    @property
    def api_status(self) -> str | None: ...
    @property
    def error(self) -> str | None: ...
    @property
    def retry_after_s(self) -> float | None: ...


@dataclass(frozen=True, slots=True)
class RetryRules:
    """The settings a verdict depends on."""

    max_attempts: int = 16
    backoff_base_s: float = 2.0
    backoff_cap_s: float = 1800.0
    pause_s: float = 60.0  # an account-blocked answer pauses the fleet this long
    slowdown_s: float = 1.0  # a "too frequent" answer holds every worker this long


class Suspect(StrEnum):
    """A delivery's mark once a pause or hold it began or kept was ended by the provider
    answering other records (the step script sets it; a replay clears it)."""

    PAUSE = "p"  # its account-blocked answers (or redirects) are its own, not the account's
    OUTAGE = "o"  # its failures that point at the provider are its own, not an outage's


@dataclass(frozen=True, slots=True)
class Verdict:
    """Everything one attempt's answer decides, recorded as it is by the store."""

    outcome: Outcome
    retry_in_s: float | None = None  # retry: the wait before the next attempt; paused: pause
    counted: bool = True  # whether the attempt uses up one of the delivery's attempts
    hold_s: float = 0.0  # fleet-wide: no worker sends before this has passed
    evidence: Evidence = Evidence.NONE  # what it says about the provider being down
    released: bool = False  # claimed in a batch, never sent: given back, due at once


# A delivery claimed in a batch and never sent (the worker stopped, or an attempt before it
# was slow or met an outage): given back, uncounted, due at once; nothing is logged.
RELEASE = Verdict(Outcome.RETRY, counted=False, released=True)


def judge(
    answer: Observed,
    attempt: int,
    rules: RetryRules,
    *,
    holding: bool = False,
    suspect: str = "",
    answered_meanwhile: bool = False,
    accepted_meanwhile: bool = False,
    rng: random.Random | None = None,
) -> Verdict:
    """The verdict on counted attempt ``attempt``; ``holding``: the fleet holds for a
    provider outage (the attempt is its probe), so a failure that points at the provider
    is the outage's, not the record's: paused, uncounted.

    ``suspect`` (the delivery's mark, see ``Suspect``): this record already kept a pause
    ('p') or a hold ('o') that other records' answers ended, so such failures of its own
    are its own: counted, with backoff, and no evidence for the fleet.
    ``answered_meanwhile``: the provider answered another delivery while this attempt was
    in flight, so a failure that would point at the provider is this record's (OWN).
    ``accepted_meanwhile``: the provider accepted another delivery while this attempt was in
    flight, so an account-blocked answer or a redirect is this record's, not the account's:
    counted, with backoff, and the fleet does not pause."""
    evidence = outage_evidence(answer.http_status, answer.api_status, answer.error)
    kind = answer.kind
    if kind is AnswerClass.BLOCKED and accepted_meanwhile and Suspect.PAUSE not in suspect:
        kind, evidence = AnswerClass.TRANSIENT, Evidence.OWN_BLOCK
    elif (Suspect.PAUSE in suspect and kind is AnswerClass.BLOCKED) or (
        Suspect.OUTAGE in suspect and evidence is Evidence.DOWN
    ):
        kind, evidence = AnswerClass.TRANSIENT, Evidence.NONE
    if answered_meanwhile and evidence is Evidence.DOWN and not holding:
        evidence = Evidence.OWN
    elif evidence is Evidence.DOWN and answer.retry_after_s:
        evidence = Evidence.WAIT
    outcome, delay = decide(
        kind, attempt, rules.max_attempts, rules.backoff_base_s, rules.backoff_cap_s,
        answer.retry_after_s, rng,
    )  # fmt: skip
    if holding and evidence.down and outcome in (Outcome.RETRY, Outcome.DEAD):
        return Verdict(Outcome.PAUSED, counted=False, evidence=evidence)  # step sets the probe
    if outcome is Outcome.PAUSED:
        return Verdict(outcome, rules.pause_s, counted=False, evidence=evidence)
    hold_s = rules.slowdown_s if answer.api_status in SLOWDOWN_CODES else 0.0
    return Verdict(outcome, delay, hold_s=hold_s, evidence=evidence)


def decide(
    kind: AnswerClass,
    attempt: int,
    max_attempts: int,
    base_s: float,
    cap_s: float,
    retry_after_s: float | None = None,
    rng: random.Random | None = None,
) -> tuple[Outcome, float | None]:
    """The outcome of counted attempt ``attempt`` and, for a retry, the wait before the next."""
    if kind is AnswerClass.SUCCESS:
        return Outcome.DELIVERED, None
    if kind is AnswerClass.DUPLICATE:
        return Outcome.DUPLICATE, None
    if kind is AnswerClass.BLOCKED:
        return Outcome.PAUSED, None
    if kind is AnswerClass.BAD_RECORD or attempt >= max_attempts:
        return Outcome.DEAD, None
    return Outcome.RETRY, retry_delay(attempt, base_s, cap_s, retry_after_s, rng)
