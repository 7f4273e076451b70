"""The deployment files (issue 4) agree with the package: Docker does not run here.

docker-compose.yml, ops/Dockerfile, ops/deploy/backfill-worker@.service and
ops/deploy/k8s-worker.yaml are checked by reading them: every ``backfill`` command they
run exists in the click group with the options given, the worker scales and shuts down
gracefully, and no secret is written into them.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
import yaml

from worker.cli import main
from worker.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "ops" / "Dockerfile"
SYSTEMD_UNIT = ROOT / "ops" / "deploy" / "backfill-worker@.service"
K8S = ROOT / "ops" / "deploy" / "k8s-worker.yaml"
ENV_EXAMPLE = ROOT / "ops" / "env.example"
DOCKERIGNORE = ROOT / ".dockerignore"

SECRETS = ("BACKFILL_API_KEY", "BACKFILL_API_SECRET")
BUILD_TOOLS = ("gcc", "g++", "build-essential", "make ", "apt-get", "apk add", "cc1")


# --- readers -----------------------------------------------------------------------------


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return loaded


def services() -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = compose()["services"]
    return found


def k8s_documents() -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(K8S.read_text()) if doc]


def k8s_deployment() -> dict[str, Any]:
    (deployment,) = [d for d in k8s_documents() if d["kind"] == "Deployment"]
    return deployment


def k8s_worker_container() -> dict[str, Any]:
    pod = k8s_deployment()["spec"]["template"]["spec"]
    (container,) = [c for c in pod["containers"] if c["name"] == "worker"]
    found: dict[str, Any] = container
    return found


def unit_directives() -> dict[str, list[str]]:
    """``Key=value`` lines of the systemd unit (a key may repeat, e.g. SystemCallFilter)."""
    directives: dict[str, list[str]] = {}
    for raw in SYSTEMD_UNIT.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        directives.setdefault(key.strip(), []).append(value.strip())
    return directives


def code_lines(text: str) -> list[str]:
    """Lines that are not blank and not comments (Dockerfile, env files)."""
    return [
        line.strip()
        for line in text.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]


def dockerfile_final_stage() -> list[str]:
    """The instructions after the last FROM, continuation lines joined, comments dropped."""
    instructions: list[str] = []
    pending = ""
    for line in code_lines(DOCKERFILE.read_text()):
        pending += line.removesuffix("\\").strip() + " "
        if not line.endswith("\\"):
            instructions.append(pending.strip())
            pending = ""
    starts = [i for i, ins in enumerate(instructions) if ins.upper().startswith("FROM ")]
    assert starts, "ops/Dockerfile has no FROM"
    return instructions[starts[-1] :]


def env_assignments(path: Path) -> dict[str, str]:
    pairs: dict[str, str] = {}
    for line in code_lines(path.read_text()):
        key, sep, value = line.partition("=")
        if sep:
            pairs[key.strip()] = value.strip()
    return pairs


def seconds(duration: str | int | float) -> float:
    """A compose duration ("45s", "1m30s", "500ms") or a number of seconds."""
    if isinstance(duration, int | float):
        return float(duration)
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", duration)
    assert parts, f"not a duration: {duration!r}"
    assert "".join(n + u for n, u in parts) == duration.replace(" ", ""), duration
    return sum(float(n) * units[u] for n, u in parts)


def default_http_timeouts_s() -> float:
    """Connect + read timeout defaults: the longest an in-flight attempt waits."""
    fields = Settings.model_fields
    return float(fields["connect_timeout_s"].default) + float(fields["read_timeout_s"].default)


def as_argv(command: str | list[str]) -> list[str]:
    return shlex.split(command) if isinstance(command, str) else [str(a) for a in command]


def healthcheck_argv(test: str | list[str]) -> list[str]:
    """The command of a compose healthcheck ("CMD", "CMD-SHELL" or a plain string)."""
    if isinstance(test, str):
        return shlex.split(test)
    if test and test[0] == "CMD-SHELL":
        return shlex.split(test[1])
    if test and test[0] == "CMD":
        return [str(a) for a in test[1:]]
    return [str(a) for a in test]


# --- every command the deployment files run ----------------------------------------------


def commands() -> Iterator[tuple[str, list[str]]]:
    """(where, argv) for every command line in the deployment files."""
    for name, service in services().items():
        if "command" in service:
            yield f"compose:{name}:command", as_argv(service["command"])
        if "entrypoint" in service:
            yield f"compose:{name}:entrypoint", as_argv(service["entrypoint"])
        test = service.get("healthcheck", {}).get("test")
        if test:
            yield f"compose:{name}:healthcheck", healthcheck_argv(test)
    for ins in dockerfile_final_stage():
        keyword, _, rest = ins.partition(" ")
        if keyword.upper() in {"CMD", "ENTRYPOINT"} and rest.strip().startswith("["):
            yield f"Dockerfile:{keyword.upper()}", json.loads(rest)
    for value in unit_directives().get("ExecStart", []):
        yield "systemd:ExecStart", shlex.split(value.lstrip("-@:+!"))
    container = k8s_worker_container()
    yield "k8s:command", [*container.get("command", []), *container.get("args", [])]
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        if probe in container and "exec" in container[probe]:
            yield f"k8s:{probe}", list(container[probe]["exec"]["command"])


def backfill_commands() -> list[tuple[str, list[str]]]:
    return [
        (where, argv) for where, argv in commands() if argv and Path(argv[0]).name == "backfill"
    ]


def resolve(argv: list[str]) -> tuple[click.Command, list[str]]:
    """The click command ``backfill ARGS`` runs and the options given to it."""
    command: click.Command = main
    args = argv[1:]
    while isinstance(command, click.Group) and args and not args[0].startswith("-"):
        name, args = args[0], args[1:]
        sub = command.commands.get(name)
        assert sub is not None, (
            f"`{' '.join(argv)}`: no subcommand {name!r}; the group has {sorted(command.commands)}"
        )
        command = sub
    assert not isinstance(command, click.Group), f"`{' '.join(argv)}` names a group, not a command"
    return command, [a.split("=", 1)[0] for a in args if a.startswith("--")]


def test_the_deployment_files_run_the_expected_commands() -> None:
    commands = dict(backfill_commands())
    found = {where: argv[1:2] for where, argv in commands.items()}
    assert found["compose:worker:command"] == ["worker"]
    assert found["compose:worker:healthcheck"] == ["health"]
    # a container's health is its own worker's: another replica's reply must not count
    for where in ("compose:worker:healthcheck", "k8s:livenessProbe", "k8s:readinessProbe"):
        assert commands[where][1:] == ["health", "--node", "celery@%h"], where
    assert found["compose:intake:command"] == ["intake"]
    assert found["compose:stub:command"] == ["stub"]
    assert found["compose:console:command"] == ["console"]
    assert found["Dockerfile:CMD"] == ["worker"]
    assert found["systemd:ExecStart"] == ["worker"]
    assert found["k8s:command"] == ["worker"]
    assert found["k8s:livenessProbe"] == found["k8s:readinessProbe"] == ["health"]


@pytest.mark.parametrize(
    ("where", "argv"), [pytest.param(w, a, id=w) for w, a in backfill_commands()]
)
def test_every_backfill_command_exists_with_its_options(where: str, argv: list[str]) -> None:
    command, options = resolve(argv)
    known = {opt for param in command.params for opt in param.opts}
    unknown = [o for o in options if o not in known]
    assert not unknown, f"{where}: `{' '.join(argv)}`: {unknown} not among {sorted(known)}"


# --- docker compose ----------------------------------------------------------------------


def test_worker_scales_without_fixed_names_or_host_ports() -> None:
    worker = services()["worker"]
    assert "container_name" not in worker
    assert "ports" not in worker
    assert "hostname" not in worker


def test_worker_shuts_down_gracefully_after_redis_is_healthy() -> None:
    worker = services()["worker"]
    assert worker["stop_signal"] == "SIGTERM"
    assert seconds(worker["stop_grace_period"]) > default_http_timeouts_s()
    assert worker["depends_on"]["redis"]["condition"] == "service_healthy"
    assert worker["environment"]["BACKFILL_REDIS_URL"] == "redis://redis:6379/0"
    assert str(worker["environment"]["BACKFILL_METRICS_PORT"]) == "9100"


def test_project_services_share_one_image_built_from_ops_dockerfile() -> None:
    for name in ("worker", "intake", "stub"):
        service = services()[name]
        assert service["build"] == {"context": ".", "dockerfile": "ops/Dockerfile"}, name
        assert service["image"] == services()["worker"]["image"], name


def test_secrets_come_from_the_env_file_not_the_compose_file() -> None:
    for name in ("worker", "intake", "stub"):
        assert services()[name]["env_file"] == ".env", name
    for name, service in services().items():
        environment = service.get("environment", {})
        keys = (
            {str(item).split("=", 1)[0] for item in environment}
            if isinstance(environment, list)
            else set(environment)
        )
        assert not keys & set(SECRETS), f"{name} sets a secret inline"
    for line in code_lines(COMPOSE.read_text()):
        assert not any(secret in line for secret in SECRETS), line


def test_redis_uses_ops_redis_conf_and_has_a_healthcheck() -> None:
    redis = services()["redis"]
    conf = "/usr/local/etc/redis/redis.conf"
    assert as_argv(redis["command"]) == ["redis-server", conf]
    assert f"./ops/redis.conf:{conf}:ro" in redis["volumes"]
    assert any(str(v).split(":")[1] == "/data" for v in redis["volumes"])
    assert "redis-cli ping" in " ".join(healthcheck_argv(redis["healthcheck"]["test"]))
    assert "appendonly yes" in (ROOT / "ops" / "redis.conf").read_text()


def test_stub_console_and_flower_only_run_under_their_profiles() -> None:
    assert services()["stub"]["profiles"] == ["local"]
    assert services()["flower"]["profiles"] == ["monitoring"]
    assert services()["console"]["profiles"] == ["monitoring"]
    for name, service in services().items():
        if name not in {"stub", "flower", "console"}:
            assert "profiles" not in service, name


def test_the_console_listens_on_loopback_only_and_waits_for_redis() -> None:
    console = services()["console"]
    assert console["ports"] == ["127.0.0.1:5557:5557"]
    assert console["depends_on"]["redis"]["condition"] == "service_healthy"
    assert console["environment"]["BACKFILL_REDIS_URL"] == "redis://redis:6379/0"
    assert "BACKFILL_CONSOLE_USERS" not in console.get("environment", {})  # from .env


def test_intake_publishes_8080_and_waits_for_redis() -> None:
    intake = services()["intake"]
    assert any(str(p).endswith("8080:8080") for p in intake["ports"])
    assert intake["depends_on"]["redis"]["condition"] == "service_healthy"


# --- Dockerfile, .dockerignore, env.example ----------------------------------------------


def test_dockerfile_final_stage_is_slim_non_root_and_without_build_tools() -> None:
    stage = dockerfile_final_stage()
    assert stage[0].split()[1] == "python:3.11-slim"
    users = [ins.split()[1] for ins in stage if ins.upper().startswith("USER ")]
    assert users, "the final stage has no USER"
    assert users[-1].split(":")[0] not in {"root", "0"}
    assert "STOPSIGNAL SIGTERM" in stage
    for ins in stage:
        assert not any(tool in ins for tool in BUILD_TOOLS), ins
        if "pip install" in ins:
            assert "--no-cache-dir" in ins, ins
    instructions = " ".join(code_lines(DOCKERFILE.read_text()))
    assert not any(secret in instructions for secret in SECRETS)
    assert len([i for i in instructions.split() if i.upper() == "FROM"]) >= 2


def test_dockerignore_keeps_secrets_and_local_state_out_of_the_context() -> None:
    patterns = set(code_lines(DOCKERIGNORE.read_text()))
    for required in (".git", "**/.venv", "**/.env", "**/*.aof", ".pytest_cache"):
        assert required in patterns, required


def test_env_example_lists_the_credentials_with_placeholders() -> None:
    values = env_assignments(ENV_EXAMPLE)
    for secret in SECRETS:
        assert secret in values, secret
        assert "replace" in values[secret].lower(), f"{secret} is not a placeholder"


# --- systemd -----------------------------------------------------------------------------


def test_systemd_unit_runs_backfill_worker_and_stops_with_sigterm() -> None:
    unit = unit_directives()
    (exec_start,) = unit["ExecStart"]
    argv = shlex.split(exec_start)
    assert Path(argv[0]).name == "backfill"
    assert argv[1] == "worker"
    # a template: one process per core, each with its own Celery node name
    assert SYSTEMD_UNIT.name.endswith("@.service")
    assert argv[argv.index("--hostname") + 1] == "backfill-%i@%H"
    assert unit["KillSignal"] == ["SIGTERM"]
    assert unit["KillMode"] == ["mixed"]
    assert float(unit["TimeoutStopSec"][0]) > default_http_timeouts_s()
    assert unit["EnvironmentFile"] == ["/etc/backfill/worker.env"]
    assert unit["User"] != ["root"]
    assert unit["NoNewPrivileges"] == ["yes"]
    assert unit["WantedBy"] == ["multi-user.target"]
    assert not any(secret in SYSTEMD_UNIT.read_text() for secret in ("API_KEY=", "API_SECRET="))


# --- Kubernetes --------------------------------------------------------------------------


def test_k8s_deployment_runs_backfill_worker_with_a_grace_period() -> None:
    deployment = k8s_deployment()
    assert deployment["apiVersion"] == "apps/v1"
    pod = deployment["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] >= 45
    assert pod["terminationGracePeriodSeconds"] > default_http_timeouts_s()
    container = k8s_worker_container()
    assert container["command"] == ["backfill", "worker"]
    assert {"name": "metrics", "containerPort": 9100, "protocol": "TCP"} in container["ports"]
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == "9100"


def test_k8s_secrets_come_from_a_secret_and_the_rest_from_a_config_map() -> None:
    container = k8s_worker_container()
    env = {item["name"]: item for item in container["env"]}
    for secret in SECRETS:
        assert "value" not in env[secret], secret
        assert env[secret]["valueFrom"]["secretKeyRef"]["name"] == "backfill-secrets"
    (config_map,) = [d for d in k8s_documents() if d["kind"] == "ConfigMap"]
    assert {"configMapRef": {"name": config_map["metadata"]["name"]}} in container["envFrom"]
    assert not set(config_map["data"]) & set(SECRETS)
    assert not any(d["kind"] == "Secret" for d in k8s_documents()), "a Secret with values"


def test_k8s_worker_runs_non_root_on_a_read_only_filesystem() -> None:
    pod = k8s_deployment()["spec"]["template"]["spec"]
    context = {**pod.get("securityContext", {}), **k8s_worker_container()["securityContext"]}
    assert context["runAsNonRoot"] is True
    assert context["runAsUser"] == 10001
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    limits = k8s_worker_container()["resources"]["limits"]
    assert limits["memory"] == "256Mi"
