"""Make sure the machine has the programs the tests talk to (the README's test command runs it).

The tests start real programs: `prometheus` (dashboards and alert rules), `chromium` (pages
rendered in a headless browser), `node` and `npm` (the independent JavaScript NATS client);
`nats-server` comes from a Python wheel. The Debian packages are listed in `.ci/apt-packages`.
Missing ones are installed with apt-get when this runs as root (or with a password-less
`sudo`); otherwise it prints the exact command to run and exits with status 1. Standard library
only: it runs before the virtual environment exists.

    python3 tests/prepare_machine.py [--check]    # --check: report, install nothing
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

PACKAGES = Path(__file__).resolve().parents[1] / ".ci" / "apt-packages"
# Debian package -> the program the tests run (NodeSource's nodejs brings npm; Debian's doesn't)
PROGRAMS = {"prometheus": "prometheus", "chromium": "chromium", "nodejs": "node", "npm": "npm"}


def wanted() -> list[str]:
    """Debian packages the tests need, in file order, plus npm (its own package on Debian)."""
    lines = PACKAGES.read_text().splitlines()
    names = [ln.split("#")[0].strip() for ln in lines]
    names = [n for n in names if n]
    return [*names, "npm"] if "nodejs" in names and "npm" not in names else names


def missing(packages: list[str]) -> list[str]:
    """The packages whose program is not on PATH."""
    return [p for p in packages if shutil.which(PROGRAMS.get(p, p)) is None]


def installer() -> list[str] | None:
    """How to run apt-get here: directly as root, through password-less sudo, or not at all."""
    if shutil.which("apt-get") is None:
        return None
    if os.geteuid() == 0:
        return []
    sudo = shutil.which("sudo")
    if sudo and subprocess.run([sudo, "-n", "true"], capture_output=True).returncode == 0:
        return ["sudo", "-n"]
    return None


def main(argv: list[str]) -> int:
    absent = missing(wanted())
    if not absent:
        return 0
    command = f"apt-get install -y {' '.join(absent)}"
    prefix = None if "--check" in argv else installer()
    if prefix is None:
        print(
            f"the tests need {', '.join(absent)} (not found on PATH); as root run:\n"
            f"    apt-get update && {command}",
            file=sys.stderr,
        )
        return 1
    print(f"installing {', '.join(absent)} for the tests", file=sys.stderr)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run([*prefix, "apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(
        [*prefix, "apt-get", "install", "-y", "-qq", *absent],
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
    )
    still = missing(absent)
    if still:
        print(f"installed, but still not on PATH: {', '.join(still)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
