"""What every benchmark script does with its results: a markdown table, printed and appended to docs/benchmarks.md.

A library of the benchmark scripts (bench_*.py, crop_batches.py): running it only says so.
"""
from __future__ import annotations

import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows])


def publish(text: str, path: Path = RESULTS, append: bool = True) -> None:
    """Prints `text` (a titled section) and, unless told not to, appends it to `path` (other scripts share it)."""
    print("\n" + text)
    if not append:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fresh = not path.exists() or path.stat().st_size == 0
    with path.open("a", encoding="utf-8") as f:
        f.write(("# Benchmarks\n\n" if fresh else "\n") + text.strip("\n") + "\n")
    print(f"appended to {path}")


if __name__ == "__main__":  # not a command: say so (and what it is for) instead of exiting 0 without a word
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from common.arguments import library_main

    sys.exit(library_main(sys.argv[1:], "scripts/bench_report.py", __doc__,
                          "the benchmark scripts (scripts/bench_*.py, scripts/crop_batches.py)"))
