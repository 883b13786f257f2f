"""The Hydra entry points' command lines checked before Hydra runs them: overrides that do not compose (a key or a
group option that does not exist, a value Hydra's grammar cannot read) and Hydra's modes given together are one
`error:` line and exit 2, where Hydra prints a block of several lines (or a traceback) and exits 1."""
from __future__ import annotations

import argparse
import contextlib
import difflib
import io
import os
import re
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra._internal.utils import get_args_parser
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, ValueType
from hydra.errors import HydraException
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import InterpolationKeyError, InterpolationResolutionError

from common.errors import SettingError

NO_KEY = re.compile(r"Could not override '([^']+)'\.")
APPENDED_GROUP = re.compile(r"Multiple values for (\S+)\. To override a value use 'override \S+: (.*)'")


def multirun(args: list[str]) -> bool:
    """Whether Hydra runs these arguments as a sweep: -m, --multirun (or a prefix argparse takes for it), or
    hydra.mode=MULTIRUN."""
    return any(arg == "-m" or (len(arg) > 2 and "--multirun".startswith(arg))
               or arg.lstrip("+") == "hydra.mode=MULTIRUN" for arg in args)


def composition_error(error: Exception) -> str:
    """Hydra's message on one line: its first line, with the group's options (or its hint, or the reason) after it."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if len(lines) == 1 and error.__cause__ is not None:  # "Error merging override ...": the reason is the cause
        lines += [line.strip() for line in str(error.__cause__).splitlines()[:1]]
    if not lines:
        return type(error).__name__
    listed = [i for i, line in enumerate(lines) if line.startswith("Available options")]
    if listed:
        end = next((i for i, line in enumerate(lines) if line.startswith("Config search path")), len(lines))
        return f"{lines[0]} (options: {', '.join(lines[listed[0] + 1:end])})"
    appended = APPENDED_GROUP.match(lines[0])
    if appended:  # Hydra's hint is defaults-list syntax, not a command line
        group, option = appended.groups()
        return f"{group} is already chosen in the config: leave out the + ({group}={option})"
    return " ".join(lines[:2])


def hydra_readable(args: list[str], path_keys: tuple[str, ...], list_keys: tuple[str, ...] = ()) -> list[str]:
    """Command-line overrides with the file-name values (of `path_keys`) that Hydra's grammar cannot read unquoted
    (non-ASCII letters, quotes, brackets, `=`, `~`...) quoted, so such paths need no quoting by hand; of `list_keys`
    written as a list (`[a.jpg,b.jpg]`), each item. Values it reads are left as they are (already quoted ones;
    `a.mp4,b.mp4` in multirun mode, a sweep): without -m such a sweep is a file name with a comma in it
    (take1,final.mp4), which Hydra would refuse as an ambiguous value."""
    parser = OverridesParser.create()
    sweeping = multirun(args)
    readable = []
    for arg in args:
        key, equals, value = arg.partition("=")
        if equals and key.lstrip("+") in (*path_keys, *list_keys):
            try:
                as_is = sweeping or not parser.parse_override(arg).is_sweep_override()
            except HydraException:
                as_is = False
            if not as_is:
                listed = key.lstrip("+") in list_keys and value.startswith("[") and value.endswith("]")
                arg = f"{key}=" + ("[" + ",".join(map(_quoted, value[1:-1].split(","))) + "]" if listed
                                   else _quoted(value))
        readable.append(arg)
    return readable


def _quoted(value: str) -> str:
    """`value` as a single-quoted Hydra string: a backslash escapes a quote, `${` (an interpolation) and itself
    where it stands before those or at the end; elsewhere it is a plain character."""
    value = re.sub(r"(\\+)(?='|\$\{|$)", lambda run: run.group(1) * 2, value)
    return "'" + value.replace("'", "\\'").replace("${", "\\${") + "'"


def check_overrides(config_dir: Path, config_name: str, args: list[str]) -> None:
    """SettingError (one line) where `args`' overrides do not compose with `config_name`, hydra.* ones included,
    or where Hydra's modes (-m, --run, --cfg, --info) are given together. In a sweep each swept setting is tried at
    its first value, and a swept config group at each of its options. Help, --version, shell completion and another
    config (--config-name, --config-path, --config-dir, --experimental-rerun) are left to Hydra, as are arguments its
    parser refuses (it says why)."""
    parsed = _hydra_arguments(args)
    if parsed is None or parsed.help or parsed.hydra_help or parsed.shell_completion or any(
            (parsed.config_path, parsed.config_name, parsed.config_dir, parsed.experimental_rerun)):
        return
    modes = [name for name, given in (("-m", parsed.multirun), ("--run", parsed.run), ("--cfg", parsed.cfg),
                                      ("--info", parsed.info)) if given]
    if len(modes) > 1:
        raise SettingError(f"{' and '.join(modes)} cannot be given together: Hydra takes one of -m, --run, --cfg, "
                           "--info")
    texts = parsed.overrides
    try:
        overrides = OverridesParser.create().parse_overrides(texts)
    except HydraException as error:
        raise SettingError(composition_error(error)) from None
    if not multirun(args):
        _compose_all(config_dir, config_name, [texts])
        return
    first, later = [], []  # each setting at its first value; (place in first, key, other options) of swept groups
    for override, text in zip(overrides, texts):
        if override.is_sweep_override():
            if override.value_type == ValueType.GLOB_CHOICE_SWEEP:
                continue  # expanded against the group's options only by Hydra's sweeper
            key, values = override.get_key_element(), list(override.sweep_string_iterator())
            if _is_group(config_dir, override):
                later.append((len(first), key, values[1:]))
            text = f"{key}={values[0]}"
        first.append(text)
    _compose_all(config_dir, config_name, [first, *(first[:place] + [f"{key}={option}"] + first[place + 1:]
                                                    for place, key, options in later for option in options)])


def _hydra_arguments(args: list[str]) -> argparse.Namespace | None:
    """`args` as Hydra's own parser reads them; None where it would print and exit (a refusal, --version)."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            return get_args_parser().parse_args(args)
        except SystemExit:
            return None


def _is_group(config_dir: Path, override: Override) -> bool:
    return (Path(config_dir) / override.key_or_group).is_dir()


def _compose_all(config_dir: Path, config_name: str, trials: list[list[str]]) -> None:
    with initialize_config_dir(config_dir=str(Path(config_dir).absolute()), version_base="1.3"):
        for overrides in trials:
            _check_interpolations(_composed(config_name, overrides, SettingError, hydra_keys=True))


def _check_interpolations(cfg: DictConfig) -> None:
    """SettingError where a setting's ${...} names no setting: a file name with `${` in it (Hydra reads it as an
    interpolation) was an InterpolationKeyError traceback where the job first read it. Interpolations of resolvers
    (${hydra:...}, ${sweep_only:...}) are left to the job, where Hydra has set them up."""
    for key in cfg:
        if key == "hydra" or OmegaConf.is_missing(cfg, key):  # ??? : the app says which value is missing
            continue
        try:
            value = cfg[key]
            if isinstance(value, (DictConfig, ListConfig)):
                OmegaConf.to_container(value, resolve=True)
        except InterpolationKeyError as error:
            raise SettingError(f"{error.full_key}: {str(error).splitlines()[0]} (Hydra reads ${{...}} as another "
                               "setting's value: for a literal ${ write \\${)") from None
        except InterpolationResolutionError:
            continue


def compose_checked(config_dir: Path, config_name: str, overrides: list[str],
                    refusal: type[SettingError] = SettingError) -> DictConfig:
    """`config_name` composed with `overrides`; where they do not compose, `refusal` with Hydra's message on one
    line (the command lines' check, and the scripts that compose the render's config in-process)."""
    with initialize_config_dir(config_dir=str(Path(config_dir).absolute()), version_base="1.3"):
        return _composed(config_name, overrides, refusal)


def _composed(config_name: str, overrides: list[str], refusal: type[SettingError],
              hydra_keys: bool = False) -> DictConfig:
    """compose() inside an initialized config dir; with `hydra_keys` hydra.* overrides are checked too (the
    result then holds Hydra's own config)."""
    try:
        return compose(config_name=config_name, overrides=list(overrides), return_hydra_config=hydra_keys)
    except HydraException as error:
        missing = NO_KEY.match(str(error))
        raise refusal((missing and _no_such_key(config_name, missing.group(1))) or composition_error(error)) from None
    except ValueError as error:  # what Hydra raises for some (`group=null`: "must be a string or a list")
        raise refusal(f"{composition_error(error)} ({', '.join(overrides)})") from None


def _no_such_key(config_name: str, key: str) -> str | None:
    """The message for an override of a key the config does not have, with the nearest key there (Hydra's hint,
    to append it with +, is refused by every stage that reads the group); None where the key is there."""
    node, found = compose(config_name=config_name, return_hydra_config=key.startswith("hydra.")), []
    for part in key.split("."):
        if not isinstance(node, DictConfig):
            return f"Could not override '{key}': {'.'.join(found)} is a value, not a group of keys"
        if part not in node:
            break
        node, found = node[part], found + [part]
    else:
        return None
    parent, known = ".".join(found), [str(k) for k in node]
    close = difflib.get_close_matches(part, known, n=1)
    where = f"{parent} has no key '{part}'" if parent else f"the config has no key or group '{part}'"
    hint = f"did you mean {'.'.join(found + close)}?" if close else f"known: {', '.join(known)}"
    return f"Could not override '{key}': {where} ({hint})"


def exit_on_bad_overrides(config_dir: Path, config_name: str, args: list[str]) -> None:
    """check_overrides for a command line: a refusal is `error: <one line>` (once, on torchrun's rank 0) and exit 2."""
    try:
        check_overrides(config_dir, config_name, args)
    except SettingError as error:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
