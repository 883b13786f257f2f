"""What the scripts that write a file share: its path refused in one line before any work, in the scripts' words.

A library of make_demo_clip.py, make_readme_figure.py, export_segmenter.py and bench_segment.py (--save-reference):
running it only says so.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path


def checked_output(path: str | Path, overwrite: bool, input: str | Path | None = None, suffixes: tuple[str, ...] = (),
                   kind: str = "file type") -> Path:
    """common.outputs.check_output's absolute target and refusals (the input itself, a folder, an unknown suffix, a
    folder that cannot be made), with an existing file refused unless `overwrite`, naming the scripts' --overwrite
    (check_output's own words name the render's overwrite=true)."""
    from common.errors import OutputError  # here: this library's --help need not import the project
    from common.outputs import check_output

    target = check_output(path, input=input, overwrite=True, suffixes=suffixes, kind=kind)
    if os.path.lexists(target) and not overwrite:
        raise OutputError(f"output {target} already exists: pass --overwrite to replace it")
    return target


if __name__ == "__main__":  # not a command: say so (and what it is for) instead of exiting 0 without a word
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from common.arguments import library_main

    sys.exit(library_main(sys.argv[1:], "scripts/script_outputs.py", __doc__,
                          "make_demo_clip.py, make_readme_figure.py, export_segmenter.py and bench_segment.py"))
