"""Stage options: one model per stage, unknown keys and wrong values refused at start with the
key's name, the reference page (docs/options.md) generated from the models."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import yaml

from services.core.config import Config, StageSettings, load_config
from services.core.errors import ConfigError
from services.local.init import config_from_args
from services.ops.options_doc import options_markdown
from services.runtime.options import option_rows, unknown_keys
from services.stages import check_options, options_model, stage_options
from services.stages.convert import Convert
from tests.stages_for_tests import ConvertLike

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent

# the least each stage needs to run, as `[stages.NAME]` settings
RUNNABLE = {
    "convert": {},
    "process": {},
    "stitch": {},
    "register": {},
    "upload": {"enabled": True, "options": {"url": "file:///tmp/tilepipe-bucket"}},
    "notify": {"impl": "services.stages.notify:Notify", "options": {"url_file": "/x/hook.url"}},
    "qc": {"impl": "command", "options": {"consumes": "tile_processed", "command": ["true"]}},
    "convert_like": {"impl": "tests.stages_for_tests:ConvertLike"},
}
# a value of the wrong type or out of range for one option of each stage
WRONG = {
    "process": ("device", "tpu"),
    "stitch": ("min_confidence", "high"),
    "register": ("threads", "many"),
    "upload": ("concurrency", 0),
    "notify": ("timeout_s", -1),
    "qc": ("timeout_s", "soon"),
    "convert_like": ("fail_until_attempt", "twice"),
}


def config_with(name: str, **options) -> Config:
    given = RUNNABLE[name]
    settings = {**given, "options": {**given.get("options", {}), **options}}
    return Config(stages={name: StageSettings.model_validate(settings)})


@pytest.mark.parametrize("name", sorted(RUNNABLE))
def test_every_stage_runs_with_its_defaults(name):
    check_options(config_with(name))


@pytest.mark.parametrize("name", sorted(RUNNABLE))
def test_an_unknown_key_is_refused_with_its_name(name):
    with pytest.raises(ConfigError) as info:
        check_options(config_with(name, min_confidnce=0.3))
    assert f"stages.{name}.options: unknown key 'min_confidnce'" in str(info.value)


def test_a_typo_names_the_key_it_resembles():
    with pytest.raises(ConfigError, match=r"did you mean 'min_confidence'\?"):
        check_options(config_with("stitch", min_confidnce=0.3))


@pytest.mark.parametrize("name", sorted(WRONG))
def test_a_wrong_value_is_refused_with_its_key(name):
    key, value = WRONG[name]
    with pytest.raises(ConfigError, match=rf"^stages\.{name}\.options\.{key}: "):
        check_options(config_with(name, **{key: value}))


def test_a_stage_refuses_its_options_when_built_too():
    """The stage parses its options once, at construction, with the same errors."""
    with pytest.raises(ConfigError, match=r"stages\.convert\.options: unknown key 'device'"):
        Convert(Config(), StageSettings(options={"device": "cpu"}))
    stage = ConvertLike(Config(), StageSettings(options={"sleep_s": "0.5"}))
    assert stage.options.sleep_s == 0.5 and stage.options.marker_dir is None


def test_a_disabled_stage_has_its_keys_checked_not_its_values():
    """Upload is off by default: no url is needed, but a typo is still refused."""
    check_options(Config(stages={"upload": StageSettings(enabled=False)}))
    check_options(Config(stages={"upload": StageSettings(options={"region": "eu-west-1"})}))
    with pytest.raises(ConfigError, match="unknown key 'regoin'"):
        check_options(Config(stages={"upload": StageSettings(options={"regoin": "eu-west-1"})}))


def test_commands_refuse_a_typo_at_start(tmp_path):
    """The file and the environment, through the config every command reads."""
    path = tmp_path / "tilepipe.toml"
    path.write_text("[stages.stitch.options]\nmin_confidence = 0.3\nfuse_volum = true\n")
    args = type("Args", (), {"config": path, "nats_url": None})()
    with pytest.raises(ConfigError, match="unknown key 'fuse_volum'"):
        config_from_args(args)
    path.write_text("[stages.stitch]\nconcurrency = 1\n")
    assert config_from_args(args).stages["stitch"].concurrency == 1
    env = {"TILEPIPE_STAGES__STITCH__OPTIONS__MIN_CONFIDENCE": "lots"}
    with pytest.raises(ConfigError, match=r"stages\.stitch\.options\.min_confidence"):
        check_options(load_config(path, environ=env))
    env = {"TILEPIPE_STAGES__STITCH__OPTIONS__MIN_CONFIDENCE": "0.4"}
    assert stage_options(load_config(path, environ=env), "stitch").min_confidence == 0.4


def test_the_reference_page_is_generated_from_the_models():
    page = (ROOT / "docs" / "options.md").read_text()
    assert page == options_markdown(), "run: tilepipe options > docs/options.md"


def test_every_option_is_described():
    for name in ("convert", "process", "stitch", "register", "upload"):
        for key, _, _, description in option_rows(options_model(name)):
            assert description, f"{name}.{key} has no description"
    for name, impl in (("notify", RUNNABLE["notify"]["impl"]), ("qc", "command")):
        for key, _, _, description in option_rows(options_model(name, impl)):
            assert description, f"{name}.{key} has no description"


def _literal(text: str) -> object:
    """A default as README states it or the reference shows it, comparable: 5 == 5.0."""
    text = text.strip().strip('"')
    try:
        return float(text)
    except ValueError:
        return text


@pytest.mark.parametrize(
    ("opening", "stage", "every"),
    [("`[stages.stitch] options`:", "stitch", True), ("Options: `axis` (", "register", False)],
)
def test_readme_states_the_defaults_of_the_models(opening, stage, every):
    """README lists some options with their defaults in parentheses: they are the models'."""
    readme = (ROOT / "README.md").read_text()
    start = readme.index(opening)
    paragraph = readme[start : readme.index("\n\n", start)]
    defaults = {key: default for key, _, default, _ in option_rows(options_model(stage))}
    found = re.findall(r"`(\w+)` \((?:`([^`]+)`|([^,:;)]+))", paragraph)
    stated = {key: quoted or plain for key, quoted, plain in found if key in defaults}
    assert stated and (set(stated) == set(defaults) or not every)
    literal = re.compile(r"-?[\d.]+|true|false|\[.*\]|\w+")
    for key, value in stated.items():
        if literal.fullmatch(value):
            assert _literal(value) == _literal(defaults[key]), (key, value, defaults[key])


def _examples() -> list[tuple[str, dict]]:
    """Every TOML example in README.md and docs/ with stage settings."""
    out = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for block in re.findall(r"```toml\n(.*?)```", doc.read_text(), re.S):
            stages = tomllib.loads(block).get("stages", {})
            out.extend((f"{doc.name}: {name}", settings) for name, settings in stages.items())
    return out


@pytest.mark.parametrize(("where", "settings"), _examples(), ids=[w for w, _ in _examples()])
def test_documented_examples_use_known_keys(where, settings):
    name, impl = where.split(": ")[1], settings.get("impl")
    if impl and impl.startswith("mypkg."):
        pytest.skip("an illustration of a plugin that is not shipped")
    StageSettings.model_validate(settings)
    unknown_keys(options_model(name, impl), settings.get("options", {}), name)


def test_the_ansible_example_uses_known_keys():
    path = ROOT / "deploy" / "ansible" / "inventory" / "example" / "group_vars" / "all.yml"
    stages = yaml.safe_load(path.read_text())["tilepipe_stages"]
    assert stages
    for name, settings in stages.items():
        StageSettings.model_validate(settings)
        unknown_keys(options_model(name), settings.get("options", {}), name)
