"""The README's test command prepares the machine: what it finds, what it asks for."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests import prepare_machine

SCRIPT = Path(prepare_machine.__file__)


def test_every_listed_package_is_found_here():
    # the test machine was prepared by this script (or by hand): nothing is missing
    assert prepare_machine.missing(prepare_machine.wanted()) == []
    assert {"prometheus", "chromium", "nodejs", "npm"} <= set(prepare_machine.wanted())


def test_missing_package_is_named_with_the_command_to_run(tmp_path, monkeypatch, capsys):
    listed = tmp_path / "apt-packages"
    listed.write_text("# comment\nprometheus\ntilepipe-no-such-program  # needed\n")
    monkeypatch.setattr(prepare_machine, "PACKAGES", listed)
    assert prepare_machine.wanted() == ["prometheus", "tilepipe-no-such-program"]
    assert prepare_machine.missing(prepare_machine.wanted()) == ["tilepipe-no-such-program"]
    assert prepare_machine.main(["--check"]) == 1
    err = capsys.readouterr().err
    assert "apt-get update && apt-get install -y tilepipe-no-such-program" in err


def test_runs_with_the_system_python_before_any_venv():
    # standard library only: the script runs outside the virtual environment
    done = subprocess.run(
        [sys.base_prefix + "/bin/python3", "-I", str(SCRIPT), "--check"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
