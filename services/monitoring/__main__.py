"""python -m services.monitoring: Prometheus config and dashboard checks."""

from __future__ import annotations

import argparse
import glob
import json
import sys
from pathlib import Path

from services.core.config import load_config
from services.monitoring.dashboards import lint_dashboard
from services.monitoring.prometheus import (
    scrape_config,
    targets_for_config,
    targets_from_up_output,
    write_prometheus_config,
)


# ---------------------------------------------------------------------------- command line
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.monitoring", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prometheus-config", help="write a Prometheus config for the services")
    p.add_argument("--up-output", type=Path, help="what `tilepipe up` printed (its URLs)")
    p.add_argument("--config", type=Path, help="tilepipe config (ports of `tilepipe run`)")
    p.add_argument("--services", default=None, help="comma-separated services (default: all)")
    p.add_argument("--interval", type=float, default=15.0, help="scrape interval, seconds")
    p.add_argument("--host", default=None, help="value of the host label (default: hostname)")
    p.add_argument("--rules", nargs="*", default=[], help="alert rule files (globs allowed)")
    p.add_argument("-o", "--output", type=Path, default=None, help="file (default: stdout)")
    p = sub.add_parser("lint-dashboards", help="check Grafana dashboard JSON files")
    p.add_argument("files", nargs="+", type=Path)
    args = parser.parse_args(argv)
    if args.command == "lint-dashboards":
        failed = 0
        for path in args.files:
            problems = lint_dashboard(json.loads(path.read_text()))
            failed += bool(problems)
            for problem in problems:
                print(f"{path}: {problem}")
        return 1 if failed else 0
    if args.up_output is not None:
        targets = targets_from_up_output(args.up_output.read_text())
    else:
        services = args.services.split(",") if args.services else None
        targets = targets_for_config(load_config(args.config), services)
    rules = [found for pattern in args.rules for found in (sorted(glob.glob(pattern)) or [pattern])]
    kwargs = {"interval_s": args.interval, "host": args.host, "rule_files": rules}
    if args.output is None:
        print(json.dumps(scrape_config(targets, **kwargs), indent=2))
    else:
        print(write_prometheus_config(args.output, targets, **kwargs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
