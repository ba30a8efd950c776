"""Configuration: TOML, environment overrides, clear errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from services.core.config import dump_toml, load_config
from services.core.errors import ConfigError
from services.stages import stage_settings


@pytest.mark.unit
def test_toml_env_overrides_and_relative_roots(tmp_path):
    path = tmp_path / "tp.toml"
    path.write_text(
        '[nats]\nurl = "nats://127.0.0.1:1"\n[roots]\nraw = "raw"\n'
        '[stages.convert_like]\nimpl = "tests.stages_for_tests:ConvertLike"\nconcurrency = 2\n'
    )
    env = {
        "TILEPIPE_NATS__URL": "nats://127.0.0.1:2",
        "TILEPIPE_STAGES__CONVERT_LIKE__CONCURRENCY": "5",
    }
    config = load_config(path, environ=env)
    assert config.nats.url == "nats://127.0.0.1:2"
    assert stage_settings(config, "convert_like").concurrency == 5
    assert config.roots.raw == (tmp_path / "raw").resolve()
    again = tmp_path / "again.toml"
    again.write_text(dump_toml(config))
    assert load_config(again, environ={}) == config


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[stages.x]\nconcurrency = 0\n", "stages.x.concurrency"),
        ("[nats]\nurll = 1\n", "nats.urll"),
        ("[stages.x]\nmax_deliver = 2\nbackoff_s = [1, 2, 3]\n", "fewer entries than max_deliver"),
        ("not toml [", "not valid TOML"),
    ],
)
@pytest.mark.unit
def test_bad_values_name_the_field(tmp_path, text, needle):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert needle in str(info.value)


@pytest.mark.unit
def test_bad_env_value_fails_at_start(tmp_path):
    with pytest.raises(ConfigError, match=r"metrics\.base_port"):
        load_config(None, environ={"TILEPIPE_METRICS__BASE_PORT": "lots"})


def test_cli_reports_config_errors_with_exit_2(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[stages.x]\nconcurrency = -1\n")
    proc = subprocess.run(
        [sys.executable, "-m", "services.ops.cli", "config", "--config", str(path)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "stages.x.concurrency" in proc.stderr


def test_check_refuses_a_stage_option_typo_with_exit_2(tmp_path):
    """`tilepipe check` (like every command) reads the config: a typo fails at start."""
    path = tmp_path / "bad.toml"
    path.write_text("[stages.stitch]\noptions = { min_confidnce = 0.3 }\n")
    manifest = tmp_path / "manifest.toml"
    proc = subprocess.run(
        [sys.executable, "-m", "services.ops.cli", "check", str(manifest), "--config", str(path)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "stages.stitch.options: unknown key 'min_confidnce'" in proc.stderr
