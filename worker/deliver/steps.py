"""What a drain's step sends to ``lua/step.lua`` and what it gets back, typed.

``Claim`` (a delivery claimed, or why none was), ``Finish`` (an attempt made and the
verdict on it, to be recorded) and ``StepResult`` (one step's reply), and the parsing of
the script's reply rows. No I/O here: ``store.Store.step`` runs the script.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from worker.deliver.policy import Verdict
from worker.deliver.provider import Answer
from worker.enqueue.record import BackfillRecord
from worker.operate.errors import InvalidRecord

LIVE, BULK = "l", "b"
# What step.lua is told of a delivery claimed in a batch and never sent (a Verdict of
# policy.RELEASE).
RELEASED_OUTCOME = "release"


@dataclass(frozen=True, slots=True)
class Claim:
    """The answer to "which delivery may I attempt now?": one claimed, or why none."""

    verdict: str  # claimed, idle, paused, probing, throttled, again, none
    delivery_id: str = ""
    token: str = ""
    attempts: int = 0  # this attempt's number: counted at the claim
    record: BackfillRecord | None = None
    replay: bool = False
    wait_s: float = 0.0  # a rate-limit slot was reserved this far ahead
    resume_in_s: float = 0.0  # paused or throttled: for this long
    detail: str = ""  # why a claimed record cannot be sent
    lane: str = LIVE  # the lane it was claimed from
    callers: str = ""  # the intake tokens that may read it
    suspect: str = ""  # policy.Suspect marks: failures of its own that no longer hold the fleet


@dataclass(frozen=True, slots=True)
class Finish:
    """An attempt made, to be recorded: the claim it used, the answer, and the verdict on
    it (``policy.judge``; ``policy.RELEASE`` for a delivery claimed and never sent)."""

    claim: Claim
    answer: Answer
    verdict: Verdict

    @property
    def outcome(self) -> str:
        """The verdict's outcome, or RELEASED_OUTCOME (claimed in a batch and never sent)."""
        return RELEASED_OUTCOME if self.verdict.released else self.verdict.outcome

    @property
    def retry_in_s(self) -> float | None:
        """The verdict's wait before the next attempt (a pause's length when paused)."""
        return self.verdict.retry_in_s

    @property
    def last_error(self) -> str:
        """The error the delivery shows after this attempt (empty after a success)."""
        if self.answer.error:
            return self.answer.error
        if self.answer.api_status not in (None, "0"):
            return f"status {self.answer.api_status}: {self.answer.api_reason or ''}".strip()
        return ""


@dataclass(frozen=True, slots=True)
class StepResult:
    """What one step did: each attempt's recorded verdict (and whether it began a pause),
    the deliveries claimed, why the claiming stopped, and the events met on the way."""

    recorded: list[tuple[str, bool]]
    claims: list[Claim]
    status: str  # idle, full, paused, probing, throttled, again, none
    resume_in_s: float = 0.0  # paused or throttled: for this long
    events: list[dict[str, Any]] = field(default_factory=list)
    outage: bool = False  # the fleet holds for a provider outage

    @property
    def claim(self) -> Claim:
        """The first delivery claimed, or a Claim whose verdict says why there is none."""
        if self.claims:
            return self.claims[0]
        return Claim(self.status, resume_in_s=self.resume_in_s)

    @property
    def finished(self) -> str:
        """The verdict of the first attempt recorded ('' when none was)."""
        return self.recorded[0][0] if self.recorded else ""

    @property
    def first_pause(self) -> bool:
        """Whether recording the first attempt began a pause."""
        return bool(self.recorded and self.recorded[0][1])


def stored_record(
    app_id: str, msgid: str, number: str, time_: str
) -> tuple[BackfillRecord | None, str]:
    """The stored record, validated again: a hand-edited one may no longer be sendable."""
    try:
        record = BackfillRecord.parse(
            {"app_id": app_id, "msgid": msgid or None, "number": number, "time": time_}
        )
    except InvalidRecord as exc:
        return None, "corrupt state: " + ", ".join(sorted(exc.errors))
    return record, ""


def _claim(raw: Sequence[Any]) -> Claim:
    delivery_id, token, attempts, app, msgid, number, time_, replay, wait, lane, callers = raw[:11]
    record, problem = stored_record(app, msgid, number, time_)
    return Claim(
        "claimed", str(delivery_id), str(token), int(attempts), record, replay == "1",
        wait_s=float(wait) / 1000, detail=problem, lane=str(lane), callers=str(callers),
        suspect=str(raw[11]) if len(raw) > 11 else "",
    )  # fmt: skip


def _count(value: Any) -> int:
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0  # a corrupt count: the event still gets logged


def _events(raw: Iterable[Sequence[Any]]) -> list[dict[str, Any]]:
    events = []
    for row in raw:
        kind, delivery_id, detail, app_id, msgid, number, time_, attempts = list(row)
        record = None
        if app_id and number and time_:
            record = BackfillRecord(str(app_id), str(number), str(time_), msgid=msgid or None)
        events.append(
            {"kind": str(kind), "delivery_id": str(delivery_id), "detail": str(detail),
             "record": record, "attempts": _count(attempts)}
        )  # fmt: skip
    return events


def parse_step_reply(raw: Sequence[Any]) -> StepResult:
    """The script's reply {recorded, status, claims, events} as a StepResult."""
    recorded, status, claims, events = raw
    return StepResult(
        [(str(v), bool(int(f))) for v, f in recorded],
        [_claim(row) for row in claims],
        str(status[0]),
        float(status[1]) / 1000 if len(status) > 1 and status[1] else 0.0,
        _events(events),
        outage=len(status) > 2 and status[2] == "1",
    )
