"""NATS users with least-privilege permissions: one user per service, plus `admin`.

The lists come from what the code does on the wire (read from a nats-server trace of the whole
pipeline, then enforced by tests/test_security.py):

- a stage creates or updates, reads and pulls from its own durable consumer (named after it)
  and acknowledges its own deliveries; publishes its output events, `stage_failed` and
  `attempt` records in its own name (their subjects end with the stage) and parked inputs
  (`tp.hold_<stage>`); reads stream info and single messages of the event log (progress and
  latency bookkeeping); watches the KV bucket `tp-holds` (an ordered consumer with flow
  control), which only `admin` writes.
- stitch and register also read `tp-lattice` and write their own keys there
  (`services.state.lattice.LATTICE_KEYS`), and read `tp-acquisitions` (where an acquisition's
  manifest is). No other stage can read `tp-lattice`.
- the watcher publishes `acq_started`, `tile_arrived`, `acq_finished`, reads stream info and
  writes `tp-acquisitions`. It has no consumer.
- every service subscribes to its own inbox only, `_INBOX_<user>.>` (replies of requests and
  pull deliveries; `services.runtime.bus.connect` sets that prefix for a named user), so no service
  can read another's replies.
- `admin` (provisioning, `tilepipe` operator commands) may do anything.

No service may publish another stage's events, use another stage's consumer, or manage
streams (create, delete, purge). `redo_<stage>` subjects are published by operators only.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from messages.subjects import HOLD, STREAM, event_filter
from services.core.config import Config, NatsSettings
from services.io.atomic import atomic_file
from services.runtime.bus import inbox_prefix
from services.stages import stage_for
from services.state.acquisitions import ACQ_BUCKET
from services.state.buckets import HOLD_BUCKET
from services.state.lattice import LATTICE_BUCKET, LATTICE_KEYS

ADMIN = "admin"
WATCHER = "watcher"

# stage -> event kinds it publishes (besides its own stage_failed, attempt and hold subjects)
STAGE_OUTPUTS: dict[str, tuple[str, ...]] = {
    "convert": ("tile_converted",),
    "process": ("tile_processed",),
    "stitch": ("pair_aligned", "slice_stitched"),
    "register": ("slice_registered", "slice_axis"),
    "upload": ("artifact_uploaded",),
}
WATCHER_OUTPUTS = ("acq_started", "tile_arrived", "acq_finished")
LATTICE_WRITERS = frozenset(LATTICE_KEYS)  # stitch, register; also read tp-acquisitions
ACQ_READERS = frozenset({"upload"})  # reads tp-acquisitions (a manifest's [names])

Permissions = dict[str, list[str]]


def _kv_stream(bucket: str) -> str:
    return f"KV_{bucket}"


def _watch_kv(bucket: str) -> list[str]:
    """Watching a KV bucket: an ephemeral ordered consumer on its stream (nats-py names no
    consumer and puts the filter in the request body, so this reads the whole bucket)."""
    kv = _kv_stream(bucket)
    return [
        f"$JS.API.STREAM.INFO.{kv}",
        f"$JS.API.CONSUMER.CREATE.{kv}",
        f"$JS.API.CONSUMER.INFO.{kv}.*",
        f"$JS.FC.{kv}.>",
    ]


def _read_kv(bucket: str) -> list[str]:
    """Single-key reads of a KV bucket (stream or direct get, as the bucket is configured)."""
    kv = _kv_stream(bucket)
    return [
        f"$JS.API.STREAM.INFO.{kv}",
        f"$JS.API.STREAM.MSG.GET.{kv}",
        f"$JS.API.DIRECT.GET.{kv}.>",
    ]


def stage_permissions(
    name: str,
    outputs: Iterable[str],
    stream: str = STREAM,
    bookkeeping: bool = False,
) -> Permissions:
    """Permissions of one stage user; `bookkeeping`: reads `tp-lattice` and writes its own keys
    there (`LATTICE_KEYS[name]`), reads acquisitions."""
    publish = [
        f"$JS.API.STREAM.INFO.{stream}",
        f"$JS.API.STREAM.MSG.GET.{stream}",
        f"$JS.API.CONSUMER.CREATE.{stream}.{name}",
        f"$JS.API.CONSUMER.INFO.{stream}.{name}",
        f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{name}",
        f"$JS.ACK.{stream}.{name}.>",
        *(event_filter(kind) for kind in outputs),
        # failure and attempt records in its own name only (the subject's last token)
        *(event_filter(kind, stage=name) for kind in ("stage_failed", "attempt")),
        event_filter(f"{HOLD}{name}"),
        *_watch_kv(HOLD_BUCKET),  # which acquisitions are on hold
    ]
    if bookkeeping:
        publish += [
            *_watch_kv(LATTICE_BUCKET),  # a mosaic's keys (transport.NatsKeyValue.entries)
            f"$JS.API.STREAM.MSG.GET.{_kv_stream(LATTICE_BUCKET)}",
            f"$JS.API.DIRECT.GET.{_kv_stream(LATTICE_BUCKET)}.>",
            *(f"$KV.{LATTICE_BUCKET}.{keys}" for keys in LATTICE_KEYS.get(name, ())),
            *_read_kv(ACQ_BUCKET),
        ]
    elif name in ACQ_READERS:
        publish += _read_kv(ACQ_BUCKET)
    return {"publish": publish, "subscribe": [f"{inbox_prefix(name)}.>"]}


def watcher_permissions(stream: str = STREAM) -> Permissions:
    """The watcher: publishes acquisition and tile arrival events, records acquisitions."""
    return {
        "publish": [
            f"$JS.API.STREAM.INFO.{stream}",
            f"$JS.API.STREAM.INFO.{_kv_stream(ACQ_BUCKET)}",
            f"$KV.{ACQ_BUCKET}.>",
            *(event_filter(kind) for kind in WATCHER_OUTPUTS),
        ],
        "subscribe": [f"{inbox_prefix(WATCHER)}.>"],
    }


def admin_permissions() -> Permissions:
    """Provisioning and operator commands (pause, replay, repair, ...): everything."""
    return {"publish": [">"], "subscribe": [">"]}


def service_permissions(stream: str = STREAM) -> dict[str, dict[str, list[str]]]:
    """{user: {"publish": [...], "subscribe": [...]}} — one user per service (watcher, convert,
    process, stitch, register, upload) plus `admin` (provisioning, operators' CLI)."""
    users: dict[str, Permissions] = {WATCHER: watcher_permissions(stream)}
    for name, outputs in STAGE_OUTPUTS.items():
        users[name] = stage_permissions(name, outputs, stream, name in LATTICE_WRITERS)
    users[ADMIN] = admin_permissions()
    return users


def plugin_permissions(name: str, produces: Iterable[str], stream: str = STREAM) -> Permissions:
    """A stage that is not built in: its declared outputs, no lattice bookkeeping."""
    return stage_permissions(name, produces, stream, bookkeeping=False)


def render_authorization(
    passwords: Mapping[str, str],
    stream: str = STREAM,
    permissions: Mapping[str, Permissions] | None = None,
) -> str:
    """The nats-server `authorization { users = [...] }` block for these users.

    `passwords` maps user -> password (plain, or a bcrypt hash from `nats server passwd`);
    `permissions` defaults to `service_permissions(stream)`. Every user in `passwords` must
    have permissions: an unknown user is an error, never a user with full rights.
    """
    table = dict(service_permissions(stream) if permissions is None else permissions)
    unknown = sorted(set(passwords) - set(table))
    if unknown:
        raise KeyError(f"no permissions defined for user(s): {', '.join(unknown)}")
    lines = ["authorization {", "  users = ["]
    for user, password in passwords.items():
        perms = table[user]
        entry = {
            "user": user,
            "password": password,
            "permissions": {
                "publish": {"allow": perms["publish"]},
                "subscribe": {"allow": perms["subscribe"]},
            },
        }
        lines.append(f"    {json.dumps(entry)}")
    lines += ["  ]", "}"]
    return "\n".join(lines) + "\n"


def render_tls(
    cert_file: Path, key_file: Path, ca_file: Path | None = None, verify: bool = False
) -> str:
    """The nats-server `tls { ... }` block; `verify` requires client certificates from `ca_file`."""
    block: dict[str, object] = {"cert_file": str(cert_file), "key_file": str(key_file)}
    if ca_file is not None:
        block["ca_file"] = str(ca_file)
    if verify:
        if ca_file is None:
            raise ValueError("verifying client certificates needs ca_file")
        block["verify"] = True
    body = "\n".join(f"  {key}: {json.dumps(value)}" for key, value in block.items())
    return f"tls {{\n{body}\n}}\n"


def write_secret(path: Path, value: str) -> Path:
    """Write a secret readable by its owner only (0600, directory 0700), atomically."""
    path = Path(path)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(value)
        os.chmod(tmp, 0o600)  # the umask may have taken bits away
    return path


def generate_passwords(users: Iterable[str], directory: Path) -> dict[str, Path]:
    """A fresh random password per user, each in `directory/<user>.pass` (0600)."""
    return {
        user: write_secret(Path(directory) / f"{user}.pass", secrets.token_urlsafe(32))
        for user in users
    }


@dataclass
class LocalAuth:
    """Users, passwords and the server block of one `tilepipe up --auth` run."""

    server_block: str
    password_files: dict[str, Path]

    def env(self, user: str) -> dict[str, str]:
        """Environment that makes a `tilepipe` process connect as `user`."""
        return {
            "TILEPIPE_NATS__USER": user,
            "TILEPIPE_NATS__PASSWORD_FILE": str(self.password_files[user]),
        }

    def settings(self, nats: NatsSettings, user: str = ADMIN) -> NatsSettings:
        """`nats` settings connecting as `user`."""
        return nats.model_copy(
            update={"user": user, "password_file": self.password_files[user], "creds_file": None}
        )


def local_auth(config: Config, services: Iterable[str], directory: Path) -> LocalAuth:
    """One user per service (plugin stages get their declared outputs) plus `admin`, with
    fresh random passwords in `directory/<user>.pass` (0600)."""

    stream = config.nats.stream
    table = service_permissions(stream)
    permissions = {ADMIN: table[ADMIN]}
    for name in services:
        if name in table and not (name in config.stages and config.stages[name].impl):
            permissions[name] = table[name]
        else:
            produces = [kind.kind for kind in stage_for(config, name).produces]
            permissions[name] = plugin_permissions(name, produces, stream)
    files = generate_passwords(permissions, directory)
    passwords = {user: path.read_text() for user, path in files.items()}
    return LocalAuth(render_authorization(passwords, stream, permissions), files)
