"""Every setting in conf/ says what it means: a comment on its line, or a comment block right above the run of
uncommented keys it heads. Hydra's own `hydra:` block and the `defaults:` list (which picks the groups, each of them
a file that documents itself) are left out."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

CONF = Path(__file__).resolve().parents[1] / "conf"
KEY = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z_][\w.+-]*):(?:\s|$)(?P<rest>.*)$")
BLOCK_SCALAR = re.compile(r"^[|>][-+]?\s*(#.*)?$")  # `header: |-`: the lines below it are text, not keys


def has_comment(value: str) -> bool:
    """A `#` that starts a comment: outside quotes, at the start or after a blank."""
    quote = None
    for i, char in enumerate(value):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or value[i - 1] in " \t"):
            return True
    return False


def undocumented(text: str) -> list[str]:
    """The keys of a YAML file with no comment on their line, nor a comment line at their own indentation right above
    them or above the uncommented keys before them (a continued comment, indented further, heads nothing)."""
    lines, missing, skip_deeper = text.splitlines(), [], None
    for number, line in enumerate(lines):
        indent = len(line) - len(line.lstrip(" "))
        if skip_deeper is not None and (not line.strip() or indent > skip_deeper):
            continue
        skip_deeper = None
        found = KEY.match(line)
        if not found:
            continue
        if indent == 0 and found["key"] in ("hydra", "defaults"):
            skip_deeper = 0
            continue
        if BLOCK_SCALAR.match(found["rest"].strip()):
            skip_deeper = indent
        if has_comment(found["rest"]):
            continue
        above = number - 1
        while above >= 0 and _bare_key_at(lines[above], indent):
            above -= 1
        if above < 0 or not lines[above].startswith(" " * indent + "#"):
            missing.append(f"{number + 1}: {line.strip()}")
    return missing


def _bare_key_at(line: str, indent: int) -> bool:
    found = KEY.match(line)
    return bool(found) and len(found["indent"]) == indent and not has_comment(found["rest"])


@pytest.mark.parametrize("path", sorted(CONF.rglob("*.yaml")), ids=lambda path: path.relative_to(CONF).as_posix())
def test_every_setting_is_commented(path):
    # r18_fpn.yaml and r50_fpn.yaml left 34 and 33 keys bare (score_threshold among them, which decides what the
    # render tracks), the schedules most of theirs, the data groups their splits, train.yaml eval_batch_size and seed
    assert undocumented(path.read_text()) == []


def test_the_check_finds_what_it_should():
    assert undocumented("# a block heads\na: 1\nb: 2\n\nc: 3\n") == ["5: c: 3"]
    assert undocumented("a: 1  # said\nb: 2\n") == ["2: b: 2"]  # an inline comment heads nothing after it
    assert undocumented("a: 1  # said\n      # and more\nb: 2\n") == ["3: b: 2"]  # nor does its continuation
    assert undocumented("x:    # a map\n  y: 1\n  z: '#' # z\n") == ["2: y: 1"]
    assert undocumented("t: |-\n  k: not a key\nhydra:\n  run: 1\n") == ["1: t: |-"]
