"""The `tilepipe` command line."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

from messages.codec import json_schemas
from services.core.config import dump_toml
from services.core.errors import ConfigError
from services.local.init import config_from_args, provision
from services.local.serve import serve
from services.local.simulate import simulate_command
from services.local.up import up
from services.ops.control_cli import add_commands, command
from services.ops.finish import finish
from services.ops.opticstream_import import import_command
from services.ops.options_doc import options_command
from services.ops.preflight import run_checks
from services.ops.process_tile import process_tile_command
from services.ops.status_cli import status_command


def cmd_schema(args: argparse.Namespace) -> int:
    schemas = json_schemas()
    if args.kind:
        if args.kind not in schemas:
            print(f"unknown event kind {args.kind!r}; known: {', '.join(schemas)}", file=sys.stderr)
            return 2
        schemas = schemas[args.kind]
    print(json.dumps(schemas, indent=2))
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    print(dump_toml(config_from_args(args)))
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    for line in asyncio.run(provision(config_from_args(args))):
        print(line)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    serve(args.service, config_from_args(args), worker=args.worker, metrics_port=args.metrics_port)
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    checks = run_checks(args.manifest, config_from_args(args))
    for check in checks:
        print(f"[{'ok' if check.ok else 'FAIL'}] {check.name}: {check.detail}")
    failed = [c for c in checks if not c.ok]
    print(f"{len(checks) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


def cmd_simulate(args: argparse.Namespace) -> int:
    return simulate_command(args)


def cmd_process_tile(args: argparse.Namespace) -> int:
    return process_tile_command(args)


def cmd_import_opticstream(args: argparse.Namespace) -> int:
    return import_command(args)


def cmd_finish(args: argparse.Namespace) -> int:
    event = asyncio.run(finish(config_from_args(args), args.acq))
    print(f"{event.acq}: finished with {event.tiles_arrived} tiles, {len(event.missing)} missing")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    return asyncio.run(status_command(config_from_args(args), args))


def cmd_ops(args: argparse.Namespace) -> int:
    return asyncio.run(command(config_from_args(args), args))


def cmd_up(args: argparse.Namespace) -> int:
    return up(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tilepipe", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, func, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(func=func)
        p.add_argument("--config", type=Path, default=None, help="tilepipe TOML config")
        p.add_argument("--nats-url", default=None, help="use this NATS server or cluster")
        return p

    p = add("schema", cmd_schema, "print the JSON Schemas of all events")
    p.add_argument("--kind", default=None, help="only this event kind")
    add("config", cmd_config, "print the effective configuration (file + environment)")
    add("options", options_command, "print every stage's options, types and defaults (Markdown)")
    add("init", cmd_init, "create or update the stream, KV buckets and stage consumers")
    p = add("run", cmd_run, "run one service (a stage, or the watcher) in the foreground")
    p.add_argument("service")
    p.add_argument("--worker", default="", help="worker id (e.g. process@gpu1)")
    p.add_argument("--metrics-port", type=int, default=None)
    p = add("check", cmd_check, "pre-flight check of an acquisition manifest")
    p.add_argument("manifest", type=Path)
    p = add("simulate", cmd_simulate, "write a simulated acquisition into the raw root")
    p.add_argument("manifest", type=Path, help="manifest.toml inside the acquisition directory")
    p.add_argument(
        "--new", action="store_true", help="write a small demo manifest at MANIFEST first"
    )
    p.add_argument("--rate", type=float, default=1.0, help="tiles per second (0: no pacing)")
    p.add_argument("--chunk-mb", type=float, default=8.0, help="write size")
    p.add_argument("--chunk-delay-s", type=float, default=0.0, help="pause between chunks")
    p.add_argument("--rename", action="store_true", help="write to a temp name, then rename")
    p.add_argument("--slices", type=int, default=None, help="only the first N slices")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--jitter-px", type=float, default=3.0)
    p.add_argument("--scatterers", type=int, default=20, help="reflectors per A-line")
    p = add(
        "process-tile",
        cmd_process_tile,
        "process one raw tile offline and write its products as NIfTI (toolbox layout)",
    )
    p.add_argument("raw", type=Path, help="raw tile file (spectral .nii/.raw or complex .nii)")
    p.add_argument("--manifest", type=Path, required=True, help="the acquisition's manifest")
    p.add_argument("--out", type=Path, required=True, help="directory for the NIfTI products")
    p.add_argument("--mosaic", type=int, default=None, help="mosaic (default: from the name)")
    p.add_argument("--prefix", default=None, help="output name prefix (default: toolbox rule)")
    p.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto")
    p = add(
        "import-opticstream",
        cmd_import_opticstream,
        "turn an opticstream PS-OCT scan config (JSON) into a tilepipe manifest",
    )
    p.add_argument("scan_config", type=Path, help="PSOCTScanConfigModel JSON")
    p.add_argument(
        "--out", type=Path, required=True, help="acquisition directory for manifest.toml"
    )
    p.add_argument("--calibration", type=Path, default=None, help="wave-pixel.mat")
    p.add_argument("--dispersion", type=Path, default=None, help="dispersion file (float64)")
    p.add_argument(
        "--slices",
        type=int,
        default=None,
        help="slices to expect (default: from the tiles in DIR, else 1)",
    )
    p.add_argument(
        "--first-slice",
        type=int,
        default=None,
        help="instrument slice number (from 1) of the first slice in DIR (default: from its tiles)",
    )
    p.add_argument("--id", default=None, help="acquisition id (default: from project_name)")
    p.add_argument("--force", action="store_true", help="overwrite an existing manifest")
    p = add("status", cmd_status, "progress of an acquisition: stages and tile lattice")
    p.add_argument("acq", nargs="?", default=None, help="acquisition id (default: the latest)")
    p.add_argument("--watch", action="store_true", help="refresh live")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    add_commands(lambda name, help_text: add(name, cmd_ops, help_text))
    p = add("finish", cmd_finish, "declare an acquisition finished (tiles may be missing)")
    p.add_argument("acq")
    p = add("up", cmd_up, "start NATS (embedded unless --nats-url) and every service")
    p.add_argument(
        "--work",
        type=Path,
        default=Path("tilepipe-work"),
        help="work directory for the embedded server, logs and generated config",
    )
    p.add_argument("--services", default=None, help="comma-separated services (default: all)")
    p.add_argument(
        "--demo",
        action="store_true",
        help="simulate a small acquisition, show live progress, stop when done",
    )
    p.add_argument("--rate", type=float, default=3.0, help="demo tiles per second")
    p.add_argument(
        "--auth",
        action="store_true",
        help="NATS users with least-privilege permissions, one per service (passwords in "
        "WORK/auth, mode 0600); operator commands then need the admin user",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    except ConnectionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
