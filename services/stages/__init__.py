"""The registry of stages: name -> implementation, imported lazily.

Built-in stages are listed here; a stage that is not built in is configured with
`[stages.NAME] impl = "module:Class"` and needs no change to this file.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from messages.subjects import PIPELINE_ORDER
from services.core.config import StageSettings
from services.runtime.options import StageOptions, parse_options, unknown_keys
from services.stages.command import Command

if TYPE_CHECKING:
    from services.core.config import Config
    from services.runtime.stage import Stage

# name -> "module:Class", in pipeline order (messages.subjects.PIPELINE_ORDER).
BUILTIN: dict[str, str] = {
    "convert": "services.stages.convert:Convert",
    "process": "services.stages.process:Process",
    "stitch": "services.stages.stitch:Stitch",
    "register": "services.stages.register:Register",
    "upload": "services.stages.upload:Upload",
}


def stage_names() -> list[str]:
    """Names of the built-in stages, in pipeline order."""
    return [name for name in PIPELINE_ORDER if name in BUILTIN]


def metrics_port_for(config: Config, name: str) -> int:
    """The configured metrics port of a service, else base_port + its position (watcher,
    the built-in stages in pipeline order, then plugin stages in config order)."""
    if name == "watcher" and config.watcher.metrics_port is not None:
        return config.watcher.metrics_port
    if name in config.stages and config.stages[name].metrics_port is not None:
        return config.stages[name].metrics_port
    plugins = [n for n, s in config.stages.items() if s.impl and n not in BUILTIN]
    names = [*PIPELINE_ORDER, *plugins]
    offset = names.index(name) if name in names else len(names)
    return config.metrics.base_port + offset


def configured_stages(config: Config) -> list[str]:
    """Enabled stages of a config: built-ins in pipeline order, then plugin stages."""
    names = stage_names() + [n for n, s in config.stages.items() if s.impl and n not in BUILTIN]
    return [n for n in names if stage_settings(config, n).enabled]


def configured_services(config: Config) -> list[str]:
    """The services of a config: the watcher, then its enabled stages."""
    return ["watcher", *configured_stages(config)]


def _import(target: str) -> type[Stage]:
    module, _, cls = target.partition(":")
    if not module or not cls:
        raise ValueError(f"stage impl {target!r} must look like 'module:Class'")
    return getattr(importlib.import_module(module), cls)


def stage_class(name: str, impl: str | None = None, options: dict | None = None) -> type[Stage]:
    """The class implementing a stage; a clear error for an unknown name."""
    if impl == "command":
        return Command.configured(name, options or {})
    if impl:
        return _import(impl)
    if name not in BUILTIN:
        known = ", ".join(BUILTIN) or "(none)"
        raise KeyError(f"unknown stage {name!r}; known stages: {known}")
    return _import(BUILTIN[name])


def stage_for(config: Config, name: str) -> type[Stage]:
    """The class of a stage as configured (plugin `impl` or built-in)."""
    given = config.stages.get(name)
    return stage_class(name, given.impl if given else None, given.options if given else None)


def stage_defaults(name: str, impl: str | None = None) -> StageSettings:
    """Default settings of a stage: its class's `defaults` over the global defaults."""
    if impl == "command":
        return StageSettings.model_validate({**Command.defaults, "impl": impl})
    known = impl or name in BUILTIN
    defaults = stage_class(name, impl).defaults if known else {}
    return StageSettings.model_validate({**defaults, "impl": impl})


def stage_settings(config: Config, name: str) -> StageSettings:
    """Settings of a stage: configured values over the stage's defaults."""
    given = config.stages.get(name)
    base = stage_defaults(name, given.impl if given else None)
    if given is None:
        return base
    merged = {**base.model_dump(), **given.model_dump(exclude_unset=True)}
    return StageSettings.model_validate(merged)


def options_model(name: str, impl: str | None = None) -> type[StageOptions]:
    """The options model of a stage (a command stage's without its configured options)."""
    return Command.options_model if impl == "command" else stage_class(name, impl).options_model


def stage_options(config: Config, name: str) -> StageOptions:
    """The typed options of a stage as configured (a `ConfigError` naming a bad key)."""
    given = stage_settings(config, name)
    return parse_options(options_model(name, given.impl), given.options, name)


def check_options(config: Config) -> None:
    """Refuse at start what a stage would refuse when built: every enabled stage's options
    are validated, a disabled stage's keys checked (`ConfigError` naming the key)."""
    enabled = set(configured_stages(config))
    for name, given in config.stages.items():
        if name in enabled:
            stage_options(config, name)
        elif given.impl or name in BUILTIN:
            unknown_keys(options_model(name, given.impl), given.options, name)
