"""What every benchmark script does with its results: a markdown table, printed and appended to docs/benchmarks.md.

A library of the benchmark scripts (bench_*.py, crop_batches.py): running it only says so.
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterable

    import torch

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows])


def report_file(text: str) -> Path:
    """argparse type of `--output`: the markdown file a section is appended to (it may exist), refused in one line
    before any work when it is a folder, not .md, or in a folder that cannot be made: found as tracebacks (or a
    stray docs/ under the cwd) only once the benchmark had run."""
    from common.errors import OutputError, one_line  # here: this library's --help need not import the project
    from common.outputs import check_output

    try:
        return check_output(text, overwrite=True, suffixes=(".md",), kind="report file")
    except OutputError as error:
        raise argparse.ArgumentTypeError(one_line(error)) from None


def add_report_options(parser: argparse.ArgumentParser, *aliases: str) -> None:
    """`--output` (and `aliases`, a script's older names for it) and `--no-append`, as every benchmark takes them."""
    parser.add_argument("--output", *aliases, type=report_file, default=RESULTS,
                        help=f"markdown file the section is appended to (default {RESULTS})")
    parser.add_argument("--no-append", action="store_true", help="print only, leave the --output file alone")


def device_name(device: torch.device) -> str:
    """The device every benchmark section names: the GPU's name, or the CPU's model with the threads torch runs on
    and the logical cores there are (decode and encode run on threads of their own)."""
    import torch  # here: this library's --help need not import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {cpu_model()} ({torch.get_num_threads()} threads, {os.cpu_count()} logical cores)"


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux, where platform.processor() is often empty), else its
    architecture."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def publish(text: str, path: Path = RESULTS, append: bool = True) -> None:
    """Prints `text` (a section under a `## ` heading) and, unless told not to, appends it to `path` (other scripts
    share it)."""
    text = text.strip("\n")
    if not text.startswith("## "):  # every benchmark's section sits at the same level of docs/benchmarks.md
        raise ValueError(f"a benchmark section starts with a '## ' heading, got {text.splitlines()[0]!r}")
    print("\n" + text + "\n")
    if not append:
        return
    path = Path(path).expanduser().absolute()  # what the user reads must say where it went, whatever the cwd
    path.parent.mkdir(parents=True, exist_ok=True)
    fresh = not path.exists() or path.stat().st_size == 0
    with path.open("a", encoding="utf-8") as f:
        f.write(("# Benchmarks\n\n" if fresh else "\n") + text + "\n")
    print(f"appended to {path}")


def worst(differences: Iterable[float]) -> float:
    """The largest difference, NaN if any is NaN: Python's max keeps a NaN only when it comes first, so a NaN loss or
    output after a finite one passed an agreement check as the finite figure."""
    values = list(differences)
    return math.nan if any(math.isnan(value) for value in values) else max(values)


if __name__ == "__main__":  # not a command: say so (and what it is for) instead of exiting 0 without a word
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from common.arguments import library_main

    sys.exit(library_main(sys.argv[1:], "scripts/bench_report.py", __doc__,
                          "the benchmark scripts (scripts/bench_*.py, scripts/crop_batches.py)"))
