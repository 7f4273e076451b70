"""Typed settings from the environment (prefix ``BACKFILL_``, SPEC section 5).

Every setting is checked when it is read: numbers are finite and within the bounds the
README's Configuration table lists, URLs are parsed (never echoed: they may carry a
password). A bad value is a ConfigError naming the variable; the commands exit 2.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from worker.deliver.policy import (
    DEFAULT_CODE_CLASSES,
    AnswerClass,
    OutageRules,
    RetryRules,
    parse_code_table,
    retry_window,
)
from worker.operate.checks import check_base_url, check_redis_url, parse_tokens, valid_host
from worker.operate.errors import ConfigError

ENV_PREFIX = "BACKFILL_"
# How long one wake-up drains before its task returns (worker.deliver.drain.BUDGET_S).
DRAIN_BUDGET_S = 5.0
# Requests in flight per worker process at most when BACKFILL_CONCURRENCY is not set (the
# memory bound: worker.deliver.inflight sizes what is used below it from the provider's latency).
DEFAULT_MAX_IN_FLIGHT = 256
# Drains (Celery threads) per worker process at most: each sends a batch at once.
MAX_DRAINS = 8
HOUR = 3600
DAY = 24 * HOUR


class Settings(BaseSettings):
    """Everything a producer or a worker can be told; defaults are production values."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="ignore", frozen=True, allow_inf_nan=False
    )

    api_key: SecretStr | None = None
    api_secret: SecretStr | None = None
    base_url: str = "https://api.itniotech.com/sms"
    redis_url: str = "redis://localhost:6379/0"
    # With a sentinel:// URL: the name of the monitored primary.
    redis_master_name: str = Field("mymaster", pattern=r"^[A-Za-z0-9_.:-]{1,128}$")
    max_attempts: int = Field(16, ge=1, le=100)
    backoff_base_s: float = Field(2.0, gt=0, le=HOUR)
    backoff_cap_s: float = Field(1800.0, gt=0, le=7 * DAY)
    connect_timeout_s: float = Field(5.0, gt=0, le=300)
    read_timeout_s: float = Field(15.0, gt=0, le=300)
    pause_s: float = Field(60.0, gt=0, le=DAY)
    log_format: Literal["json", "console"] = "json"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # Idempotent enqueue remembers a record this long (seconds); 7 days.
    dedupe_ttl_s: int = Field(7 * DAY, ge=60, le=90 * DAY)
    # A delivered record keeps its attempts this long (for `status` and operators), then
    # only the marker idempotent enqueue needs is kept, for the dedupe window.
    keep_delivered_s: int = Field(900, ge=0, le=DAY)
    # Enqueue keeps an index by msgid and app_id for `backfill find`, the intake's GET
    # /v1/backfills and the console's search (README "Finding a delivery by msgid").
    lookup_index: bool = True
    # Overrides of the provider code table, e.g. "-16:bad_record,-99:transient".
    codes: str = ""
    # Requests in flight per worker process at most; unset: sized from the provider's
    # latency up to DEFAULT_MAX_IN_FLIGHT (docs/latency.md).
    concurrency: int | None = Field(None, ge=1, le=512)
    queue: str = Field("backfill", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    scheduler_tick_s: float = Field(0.25, gt=0, le=10)
    # Broker visibility timeout; must exceed the longest time a task holds a message.
    visibility_timeout_s: float = Field(300.0, gt=0, le=7 * DAY)
    # How long SIGTERM waits for in-flight attempts before the worker stops.
    shutdown_timeout_s: float = Field(30.0, ge=0, le=HOUR)
    # Intake bearer tokens, "name:token,name2:token2" (the name goes in the audit).
    intake_tokens: SecretStr | None = None
    # Web console users, "name:password,..." (checked by `backfill console` only).
    console_users: SecretStr | None = None
    # Prometheus metrics port of each worker; unset = off.
    metrics_port: int | None = Field(None, ge=1, le=65535)
    # Where the metrics server listens: all interfaces, so Prometheus can scrape a container.
    metrics_host: str = "0.0.0.0"
    # Fleet-wide requests per second to the provider; 0 = off.
    rate_limit: float = Field(0.0, ge=0, le=1e6)
    # How many requests may go at once before the rate applies.
    rate_burst: int = Field(1, ge=1, le=10_000)
    # A "too frequent" answer (-15, -27, -28) holds every worker this long.
    slowdown_s: float = Field(1.0, ge=0, le=HOUR)
    # `backfill health`: a worker with work waiting this long and no attempt finished in
    # that time is stalled (unhealthy).
    stall_after_s: float = Field(120.0, ge=5, le=DAY)
    # Outage hold (README "Provider outages"): this many failures that point at the
    # provider (connection, timeout, TLS, HTTP 5xx/429), of at least OUTAGE_DELIVERIES
    # distinct deliveries, within OUTAGE_WINDOW_S and with no answer from the provider in
    # between, hold the fleet; one probe at a time, its wait doubling up to PROBE_CAP_S.
    outage_failures: int = Field(8, ge=2, le=1000)
    outage_deliveries: int = Field(3, ge=1, le=1000)
    outage_window_s: float = Field(60.0, ge=1, le=HOUR)
    outage_probe_cap_s: float = Field(60.0, ge=1, le=HOUR)
    # ... and at least this many of those deliveries failed a retry too (0: not needed): a
    # provider that drops only each record's first request is no outage.
    outage_retried: int = Field(1, ge=0, le=1000)
    # After a hold (or a pause) ends, sends ramp up from this rate (per second), doubling
    # every RAMP_DOUBLE_S, until it passes 256 times the start; 0 = no ramp.
    ramp_start_per_s: float = Field(5.0, ge=0, le=1e5)
    ramp_double_s: float = Field(2.0, gt=0, le=HOUR)
    # A hold or pause no longer than this resumes near the rate before it, not at the start.
    ramp_short_hold_s: float = Field(30.0, ge=0, le=DAY)
    # Sign with the shared clock (Redis TIME): the worker's offset from it is measured at
    # start-up and with every heartbeat. Off: sign with this host's clock as it is.
    clock_correction: bool = True
    # An offset larger than this is logged as an error (and, uncorrected, fails `health`).
    clock_max_offset_s: float = Field(30.0, gt=0, le=DAY)
    # Run against a Redis whose maxmemory-policy evicts keys (records can vanish): only
    # when the operator accepts that loss.
    accept_eviction: bool = False

    @field_validator("log_format", "log_level", mode="before")
    @classmethod
    def _any_case(cls, value: Any, info: Any) -> Any:
        if not isinstance(value, str):
            return value
        return value.strip().upper() if info.field_name == "log_level" else value.strip().lower()

    @field_validator("metrics_port", "concurrency", mode="before")
    @classmethod
    def _blank_is_off(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("api_key", "api_secret")
    @classmethod
    def _header_safe(cls, value: SecretStr | None) -> SecretStr | None:
        # A stray "\r" from a CRLF env file would sign every request wrong; say so instead.
        text = "" if value is None else value.get_secret_value()
        if text and (text != text.strip() or not text.isprintable()):
            raise ValueError("has surrounding whitespace or control characters")
        return value

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        return check_base_url(value)

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str) -> str:
        return check_redis_url(value)

    @field_validator("metrics_host")
    @classmethod
    def _metrics_host(cls, value: str) -> str:
        if not valid_host(value):
            raise ValueError("expected an IP address or a host name, e.g. 0.0.0.0 or 127.0.0.1")
        return value

    @field_validator("intake_tokens")
    @classmethod
    def _tokens(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            parse_tokens(value.get_secret_value())
        return value

    @field_validator("codes")
    @classmethod
    def _code_table(cls, value: str) -> str:
        parse_code_table(value)
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.backoff_cap_s < self.backoff_base_s:
            raise ValueError("BACKFILL_BACKOFF_CAP_S must be >= BACKFILL_BACKOFF_BASE_S")
        if self.outage_deliveries > self.outage_failures:
            raise ValueError(
                "BACKFILL_OUTAGE_DELIVERIES must be <= BACKFILL_OUTAGE_FAILURES (each failure "
                "is of one delivery)"
            )
        if self.visibility_timeout_s <= self.attempt_lease_s + DRAIN_BUDGET_S:
            raise ValueError(
                "BACKFILL_VISIBILITY_TIMEOUT_S must exceed what a wake-up may hold its "
                f"message: the attempt lease ({self.attempt_lease_s:g} s) plus a drain's "
                f"budget ({DRAIN_BUDGET_S:g} s)"
            )
        return self

    @property
    def max_in_flight(self) -> int:
        """Requests one worker process may have in flight at most (the cap)."""
        return self.concurrency or DEFAULT_MAX_IN_FLIGHT

    @property
    def drains(self) -> int:
        """Celery threads per worker process: drains, each sending a batch at once."""
        return min(self.max_in_flight, MAX_DRAINS)

    @property
    def attempt_lease_s(self) -> float:
        """How long one attempt may hold a delivery before another worker may take it."""
        return self.connect_timeout_s + self.read_timeout_s + 10.0

    @cached_property
    def code_table(self) -> dict[str, AnswerClass]:
        """The provider code table in force: the default plus configured overrides."""
        return {**DEFAULT_CODE_CLASSES, **parse_code_table(self.codes)}

    @cached_property
    def retry_rules(self) -> RetryRules:
        """What a verdict on an answer depends on (``policy.judge``)."""
        return RetryRules(
            max_attempts=self.max_attempts,
            backoff_base_s=self.backoff_base_s,
            backoff_cap_s=self.backoff_cap_s,
            pause_s=self.pause_s,
            slowdown_s=self.slowdown_s,
        )

    @property
    def outage_rules(self) -> OutageRules:
        """The outage detector's thresholds and the ramp after a hold."""
        return OutageRules(
            failures=self.outage_failures,
            deliveries=self.outage_deliveries,
            window_s=self.outage_window_s,
            probe_cap_s=self.outage_probe_cap_s,
            ramp_start_per_s=self.ramp_start_per_s,
            ramp_double_s=self.ramp_double_s,
            retried=self.outage_retried,
            short_s=self.ramp_short_hold_s,
        )

    def retry_window_s(self) -> float:
        """The longest wait between first and last attempt these settings allow."""
        return retry_window(self.max_attempts, self.backoff_base_s, self.backoff_cap_s)

    def credentials(self) -> tuple[str, str]:
        """The API key and secret, or ConfigError naming the missing variable."""
        missing = [
            f"{ENV_PREFIX}{name.upper()}"
            for name in ("api_key", "api_secret")
            if getattr(self, name) is None or not getattr(self, name).get_secret_value()
        ]
        if missing:
            raise ConfigError(f"{', '.join(missing)}: required by the worker, not set")
        assert self.api_key is not None
        assert self.api_secret is not None
        return self.api_key.get_secret_value(), self.api_secret.get_secret_value()


def load_settings(**overrides: object) -> Settings:
    """Read the environment; bad values raise ConfigError naming each variable."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = []
        for error in exc.errors(include_input=False, include_url=False):
            name = "".join(str(part) for part in error["loc"][:1])
            message = error["msg"].removeprefix("Value error, ")
            # a check across settings names its variables itself
            problems.append(f"{ENV_PREFIX}{name.upper()}: {message}" if name else message)
        raise ConfigError("; ".join(problems)) from None
