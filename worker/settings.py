"""Typed settings from the environment (prefix ``BACKFILL_``, SPEC section 5)."""

from __future__ import annotations

from functools import cached_property
from typing import Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from worker.errors import ConfigError
from worker.policy import DEFAULT_CODE_CLASSES, AnswerClass, parse_code_table, retry_window

ENV_PREFIX = "BACKFILL_"


class Settings(BaseSettings):
    """Everything a producer or a worker can be told; defaults are production values."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    api_key: SecretStr | None = None
    api_secret: SecretStr | None = None
    base_url: str = "https://api.itniotech.com/sms"
    redis_url: str = "redis://localhost:6379/0"
    # With a sentinel:// URL: the name of the monitored primary.
    redis_master_name: str = "mymaster"
    max_attempts: int = Field(16, ge=1, le=100)
    backoff_base_s: float = Field(2.0, gt=0)
    backoff_cap_s: float = Field(1800.0, gt=0)
    connect_timeout_s: float = Field(5.0, gt=0)
    read_timeout_s: float = Field(15.0, gt=0)
    pause_s: float = Field(60.0, gt=0)
    log_format: Literal["json", "console"] = "json"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # Idempotent enqueue remembers a record this long (seconds); 7 days.
    dedupe_ttl_s: int = Field(7 * 24 * 3600, ge=60)
    # Overrides of the provider code table, e.g. "-16:bad_record,-99:transient".
    codes: str = ""
    concurrency: int = Field(16, ge=1, le=512)
    queue: str = Field("backfill", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    # A dispatched delivery not started within this many seconds is dispatched again.
    requeue_after_s: float = Field(60.0, ge=5)
    # Deliveries due for an attempt are dispatched only while the queue is shorter.
    dispatch_high_water: int = Field(2000, ge=1)
    scheduler_tick_s: float = Field(0.25, gt=0, le=10)
    # Broker visibility timeout; must exceed the longest time a task holds a message.
    visibility_timeout_s: float = Field(300.0, gt=0)
    # How long SIGTERM waits for in-flight attempts before the worker stops.
    shutdown_timeout_s: float = Field(30.0, ge=0)
    # Intake bearer tokens, "name:token,name2:token2" (the name goes in the audit).
    intake_tokens: SecretStr | None = None
    # Prometheus metrics port of each worker; unset = off.
    metrics_port: int | None = Field(None, ge=1, le=65535)
    # Fleet-wide requests per second to the provider; 0 = off.
    rate_limit: float = Field(0.0, ge=0)
    # How many requests may go at once before the rate applies.
    rate_burst: int = Field(1, ge=1)
    # A "too frequent" answer (-15, -27, -28) holds every worker this long.
    slowdown_s: float = Field(1.0, ge=0)
    # `backfill health`: a worker with work waiting this long and no attempt finished in
    # that time is stalled (unhealthy).
    stall_after_s: float = Field(120.0, ge=5, le=86400)

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("https://", "http://")):
            raise ValueError("expected an http:// or https:// URL")
        return value.rstrip("/")

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str) -> str:
        if not value.startswith(("redis://", "rediss://", "unix://", "sentinel://")):
            raise ValueError(
                "expected a redis://, rediss://, unix:// or "
                "sentinel://h1:26379;sentinel://h2:26379 URL"
            )
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
        if self.visibility_timeout_s <= self.attempt_lease_s + self.requeue_after_s:
            raise ValueError(
                "BACKFILL_VISIBILITY_TIMEOUT_S must exceed the attempt lease "
                f"({self.attempt_lease_s:g} s) plus BACKFILL_REQUEUE_AFTER_S"
            )
        return self

    @property
    def attempt_lease_s(self) -> float:
        """How long one attempt may hold a delivery before another worker may take it."""
        return self.connect_timeout_s + self.read_timeout_s + 10.0

    @cached_property
    def code_table(self) -> dict[str, AnswerClass]:
        """The provider code table in force: the default plus configured overrides."""
        return {**DEFAULT_CODE_CLASSES, **parse_code_table(self.codes)}

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


def parse_tokens(spec: str) -> dict[str, str]:
    """Parse ``name:token,name2:token2`` into {name: token} (ValueError without the tokens)."""
    tokens: dict[str, str] = {}
    for position, item in enumerate(filter(None, (p.strip() for p in spec.split(","))), 1):
        name, sep, token = item.partition(":")
        if not sep or not name.strip() or len(token.strip()) < 16:
            raise ValueError(
                f"entry {position}: expected NAME:TOKEN with a token of 16 or more characters"
            )
        tokens[name.strip()] = token.strip()
    return tokens


def load_settings(**overrides: object) -> Settings:
    """Read the environment; bad values raise ConfigError naming each variable."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = []
        for error in exc.errors(include_input=False, include_url=False):
            name = "".join(str(part) for part in error["loc"][:1])
            where = f"{ENV_PREFIX}{name.upper()}" if name else "settings"
            problems.append(f"{where}: {error['msg']}")
        raise ConfigError("; ".join(problems)) from None
