"""One TOML configuration file, validated by pydantic, with environment overrides.

Environment variables `TILEPIPE_<SECTION>__<FIELD>[__<FIELD>...]` override the file, e.g.
`TILEPIPE_NATS__URL=nats://10.0.0.2:4222` or `TILEPIPE_STAGES__PROCESS__CONCURRENCY=4`.
Values are parsed as JSON when they parse (numbers, booleans, lists), else taken as strings.
"""

from __future__ import annotations

import json
import os
import stat
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from messages.codec import MAX_PAYLOAD_BYTES
from messages.paths import resolve_in_root
from messages.subjects import STREAM
from services.core.errors import ConfigError
from services.core.tomlio import to_toml, toml_read_errors

ENV_PREFIX = "TILEPIPE_"


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
    # Limits, applied by `tilepipe init` (services/runtime/provision.py). A full stream or bucket
    # refuses new messages (nothing already stored is dropped); alert TilepipeStreamNearlyFull
    # fires at 80 %. nats-server reserves each max_bytes in its JetStream store.
    max_bytes: Annotated[int, Field(gt=0)] = Field(
        default=2 << 30, description="size of the event stream"
    )
    max_msg_size: Annotated[int, Field(gt=0)] = Field(
        default=MAX_PAYLOAD_BYTES + (8 << 10), description="largest event, headers included"
    )
    max_msgs_per_subject: Annotated[int, Field(gt=0)] = Field(
        default=1000, description="newest messages a subject keeps (e.g. one tile's attempts)"
    )
    kv_max_bytes: Annotated[int, Field(gt=0)] = Field(
        default=256 << 20, description="size of each KV bucket"
    )
    kv_max_value_size: Annotated[int, Field(gt=0)] = 64 << 10
    kv_history: Annotated[int, Field(ge=1, le=64)] = 5

    @model_validator(mode="before")
    @classmethod
    def _no_inline_secrets(cls, data: Any) -> Any:
        if isinstance(data, dict) and ("password" in data or "token" in data):
            raise ValueError(
                "secrets are never inline: put the password in a file readable by the service "
                "only (mode 600) and set password_file (or TILEPIPE_NATS__PASSWORD_FILE)"
            )
        return data

    @field_validator("password_file", "creds_file")
    @classmethod
    def _private_file(cls, path: Path | None) -> Path | None:
        return None if path is None else check_secret_file(path, forbidden=0o077)

    @field_validator("tls_key_file")
    @classmethod
    def _private_key(cls, path: Path | None) -> Path | None:
        return None if path is None else check_secret_file(path, forbidden=0o007)

    @model_validator(mode="after")
    def _tls_pairs(self) -> NatsSettings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together (client certificate)")
        return self


def check_secret_file(path: Path, forbidden: int) -> Path:
    """A secret file must exist, be a readable regular file, and have none of the `forbidden`
    permission bits (0o077: group and others; 0o007: others)."""
    try:
        st = path.stat()
    except OSError as exc:
        raise ValueError(f"{path}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{path}: not a regular file")
    mode = stat.S_IMODE(st.st_mode)
    if mode & forbidden:
        who = "group or others" if forbidden & 0o070 else "others"
        raise ValueError(f"{path}: mode {mode:04o} lets {who} at a secret; chmod 600 it")
    if not os.access(path, os.R_OK):
        raise ValueError(f"{path}: not readable by this user")
    return path


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
    stalled_s: Annotated[float, Field(gt=0)] = Field(
        default=300.0, description="log a tile file below its size that stops growing this long"
    )
    metrics_port: Annotated[int, Field(ge=0, le=65535)] | None = None


class SweepSettings(Strict):
    """Removal of temporary outputs (`.<name>.tmp-...`) under the work and output roots that
    no live writer owns, by every stage process at start-up and every `interval_s`."""

    interval_s: Annotated[float, Field(gt=0)] = 600.0
    max_age_s: Annotated[float, Field(gt=0)] = Field(
        default=86400.0,
        description="also remove temporaries older than this whatever their writer (another "
        "host's, a pid reused)",
    )


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
    sweep: SweepSettings = Field(default_factory=SweepSettings)
    stages: dict[str, StageSettings] = Field(default_factory=dict)


def _env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for key, value in environ.items():
        if not key.startswith(ENV_PREFIX) or "__" not in key:
            continue
        parts = [p.lower() for p in key[len(ENV_PREFIX) :].split("__")]
        node = tree
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{key}: conflicts with another {ENV_PREFIX} variable")
        if isinstance(node.get(parts[-1]), dict):
            raise ConfigError(f"{key}: conflicts with another {ENV_PREFIX} variable")
        try:
            node[parts[-1]] = json.loads(value)
        except ValueError:  # not JSON (or a number too long to convert): a string
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
        with toml_read_errors(path, "config file", ConfigError):
            data = tomllib.loads(Path(path).read_text())
    data = _merge(data, _env_overrides(os.environ if environ is None else environ))
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None
    base = Path(path).resolve().parent if path is not None else Path.cwd()
    try:
        roots = {
            name: (p if p.is_absolute() else (base / p)).resolve()
            for name, p in config.roots.model_dump().items()
        }
    except (ValueError, OSError, RuntimeError) as exc:  # NUL byte, symlink loop
        raise ConfigError(f"{source}: invalid configuration\n  roots: {exc}") from None
    return config.model_copy(update={"roots": Roots(**roots)})


def dump_toml(config: Config) -> str:
    """A TOML rendering of a config (used by `tilepipe up` and `tilepipe config`)."""

    return to_toml(config.model_dump(mode="json", by_alias=True))
