"""One TOML configuration file, validated by pydantic, with environment overrides.

Environment variables `TILEPIPE_<SECTION>__<FIELD>[__<FIELD>...]` override the file, e.g.
`TILEPIPE_NATS__URL=nats://10.0.0.2:4222` or `TILEPIPE_STAGES__PROCESS__CONCURRENCY=4`.
Values are parsed as JSON when they parse (numbers, booleans, lists), else taken as strings.
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from messages.paths import resolve_in_root
from messages.subjects import STREAM

ENV_PREFIX = "TILEPIPE_"


class ConfigError(ValueError):
    """A configuration that cannot be used, with field names and reasons."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class NatsSettings(Strict):
    """How services reach NATS."""

    url: str = "nats://127.0.0.1:4222"
    stream: str = STREAM
    user: str | None = None
    password_file: Path | None = Field(default=None, description="file holding the password")
    creds_file: Path | None = None
    tls_ca_file: Path | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    connect_timeout_s: Annotated[float, Field(gt=0)] = 5.0
    duplicate_window_s: Annotated[float, Field(gt=0)] = 3600.0
    max_age_days: Annotated[float, Field(ge=0)] = 0.0
    replicas: Annotated[int, Field(ge=1, le=5)] = 1


class Roots(Strict):
    """Data roots of this host; events carry paths relative to them."""

    raw: Path = Path("data/raw")
    work: Path = Path("data/work")
    output: Path = Path("data/output")

    def resolve(self, root: str, rel: str) -> Path:
        """Absolute path of `rel` under the named root; refuses paths that escape it."""
        return resolve_in_root(getattr(self, root), rel)


class StageSettings(Strict):
    """Consumer and worker settings of one stage."""

    enabled: bool = True
    impl: str | None = Field(
        default=None, description="`module:Class` of a stage that is not built in (plugins)"
    )
    concurrency: Annotated[int, Field(ge=1, le=1024)] = 1
    workers: Annotated[int, Field(ge=1, le=1024)] = Field(
        default=1, description="processes sharing this stage's consumer (e.g. one per GPU)"
    )
    drain_timeout_s: Annotated[float, Field(ge=0)] = 60.0
    record_attempts: bool = Field(
        default=True, description="publish an `attempt` event per delivery (tile history)"
    )
    ack_wait_s: Annotated[float, Field(gt=0, le=86400)] = 30.0
    max_deliver: Annotated[int, Field(ge=1, le=1000)] = 5
    backoff_s: list[Annotated[float, Field(gt=0)]] = Field(default_factory=lambda: [1.0, 5.0, 30.0])
    metrics_port: Annotated[int, Field(ge=0, le=65535)] | None = None
    options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _backoff_fits(self) -> StageSettings:
        if len(self.backoff_s) >= self.max_deliver and self.max_deliver > 1:
            raise ValueError("backoff_s must have fewer entries than max_deliver")
        return self


class WatcherSettings(Strict):
    """The watcher service (the source of tile events)."""

    settle_s: Annotated[float, Field(ge=0)] | None = Field(
        default=None, description="override the manifests' settle interval"
    )
    rescan_s: Annotated[float, Field(gt=0)] = 60.0
    force_polling: bool = Field(default=False, description="poll (network filesystems)")
    metrics_port: Annotated[int, Field(ge=0, le=65535)] | None = None


class MetricsSettings(Strict):
    host: str = "127.0.0.1"
    base_port: Annotated[int, Field(ge=0, le=65535)] = 9400


class LogSettings(Strict):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    level: str = "info"
    json_format: bool = Field(default=True, alias="json")


class Config(Strict):
    """The whole configuration of one host."""

    nats: NatsSettings = Field(default_factory=NatsSettings)
    roots: Roots = Field(default_factory=Roots)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    log: LogSettings = Field(default_factory=LogSettings)
    watcher: WatcherSettings = Field(default_factory=WatcherSettings)
    stages: dict[str, StageSettings] = Field(default_factory=dict)

    def stage(self, name: str) -> StageSettings:
        """Settings of a stage: configured values over the stage's defaults."""
        from services.stages import stage_defaults

        given = self.stages.get(name)
        base = stage_defaults(name, given.impl if given else None)
        if given is None:
            return base
        merged = {**base.model_dump(), **given.model_dump(exclude_unset=True)}
        return StageSettings.model_validate(merged)


def _env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for key, value in environ.items():
        if not key.startswith(ENV_PREFIX) or "__" not in key:
            continue
        parts = [p.lower() for p in key[len(ENV_PREFIX) :].split("__")]
        node = tree
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        try:
            node[parts[-1]] = json.loads(value)
        except json.JSONDecodeError:
            node[parts[-1]] = value
    return tree


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def format_validation_error(exc: ValidationError, source: str) -> str:
    """One line per bad field: `where: field.path: reason`."""
    lines = [f"{source}: invalid configuration"]
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(root)"
        lines.append(f"  {loc}: {err['msg']}")
    return "\n".join(lines)


def load_config(path: Path | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Read the TOML file (if any), apply env overrides, validate; relative roots resolve
    against the file's directory."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            data = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    data = _merge(data, _env_overrides(os.environ if environ is None else environ))
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None
    base = Path(path).resolve().parent if path is not None else Path.cwd()
    roots = {
        name: (p if p.is_absolute() else (base / p)).resolve()
        for name, p in config.roots.model_dump().items()
    }
    return config.model_copy(update={"roots": Roots(**roots)})


def dump_toml(config: Config) -> str:
    """A TOML rendering of a config (used by `tilepipe up` and `tilepipe config`)."""
    from services.tomlio import to_toml

    return to_toml(config.model_dump(mode="json", by_alias=True))
