"""The Hydra entry points' command lines checked before Hydra runs them: overrides that do not compose (a key or a
group option that does not exist, a value Hydra's grammar cannot read) are one `error:` line and exit 2, where
Hydra prints a block of several lines and exits 1."""
from __future__ import annotations

import os
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ValueType
from hydra.errors import HydraException
from omegaconf import DictConfig

from common.errors import SettingError


def multirun(args: list[str]) -> bool:
    """Whether Hydra runs these arguments as a sweep: -m, --multirun (or a prefix argparse takes for it), or
    hydra.mode=MULTIRUN."""
    return any(arg == "-m" or (len(arg) > 2 and "--multirun".startswith(arg))
               or arg.lstrip("+") == "hydra.mode=MULTIRUN" for arg in args)


def composition_error(error: Exception) -> str:
    """Hydra's message on one line: its first line, with the group's options (or its hint) after it."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    listed = [i for i, line in enumerate(lines) if line.startswith("Available options")]
    if listed:
        end = next((i for i, line in enumerate(lines) if line.startswith("Config search path")), len(lines))
        return f"{lines[0]} (options: {', '.join(lines[listed[0] + 1:end])})"
    return " ".join(lines[:2])


def check_overrides(config_dir: Path, config_name: str, args: list[str]) -> None:
    """SettingError (one line) where `args`' overrides do not compose with `config_name`. In a sweep each swept
    setting is tried at its first value. Arguments for Hydra itself (--help, --cfg, --info, ...) and hydra.*
    overrides are left to Hydra: with them nothing is checked."""
    sweep = multirun(args)
    if any(arg.startswith("-") and not multirun([arg]) for arg in args):
        return
    texts = [arg for arg in args if not arg.startswith("-")]
    try:
        overrides = OverridesParser.create().parse_overrides(texts)
    except HydraException as error:
        raise SettingError(composition_error(error)) from None
    trial = []
    for override, text in zip(overrides, texts):
        if override.key_or_group.split(".")[0].split("/")[0] == "hydra":
            continue
        if sweep and override.is_sweep_override():
            if override.value_type == ValueType.GLOB_CHOICE_SWEEP:
                continue  # expanded against the group's options only by Hydra's sweeper
            text = f"{override.get_key_element()}={next(iter(override.sweep_string_iterator()))}"
        trial.append(text)
    compose_checked(config_dir, config_name, trial)


def compose_checked(config_dir: Path, config_name: str, overrides: list[str],
                    refusal: type[SettingError] = SettingError) -> DictConfig:
    """`config_name` composed with `overrides`; where they do not compose, `refusal` with Hydra's message on one
    line (the command lines' check, and the scripts that compose the render's config in-process)."""
    with initialize_config_dir(config_dir=str(Path(config_dir).absolute()), version_base="1.3"):
        try:
            return compose(config_name=config_name, overrides=list(overrides))
        except HydraException as error:
            raise refusal(composition_error(error)) from None
        except ValueError as error:  # what Hydra raises for some (`group=null`: "must be a string or a list")
            raise refusal(f"{composition_error(error)} ({', '.join(overrides)})") from None


def exit_on_bad_overrides(config_dir: Path, config_name: str, args: list[str]) -> None:
    """check_overrides for a command line: a refusal is `error: <one line>` (once, on torchrun's rank 0) and exit 2."""
    try:
        check_overrides(config_dir, config_name, args)
    except SettingError as error:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
