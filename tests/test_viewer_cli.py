"""The viewer's command line: arguments it cannot use end in one line on stderr, never a traceback."""
from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.debug_fixture import write_dump

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("port", ["99999", "-1", "65536"])
def test_port_out_of_range_gives_one_clear_error(tmp_path, port):
    d = tmp_path / "d"
    write_dump(d, n=1, max_side=32)
    cli = subprocess.run([sys.executable, "-m", "pipeline.viewer", str(d), "--no-browser", "--port", port],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert cli.returncode == 2 and cli.stdout == "", cli.stderr
    assert cli.stderr.startswith("error: ") and "0-65535" in cli.stderr and port in cli.stderr
    assert len(cli.stderr.strip().splitlines()) == 1 and "Traceback" not in cli.stderr


@pytest.mark.parametrize("name", ["frames.jsonl", "manifest.json"])
def test_a_dump_file_that_cannot_be_read_is_named(tmp_path, name):
    """Any OSError reading the dump was reported as "cannot listen on 127.0.0.1:0: ...", naming no file."""
    d = tmp_path / "d"
    write_dump(d, n=1, max_side=32)
    (d / name).unlink()
    (d / name).mkdir()                       # reading it fails with an OSError (IsADirectoryError), even as root
    cli = subprocess.run([sys.executable, "-m", "pipeline.viewer", str(d), "--no-browser", "--port", "0"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert cli.returncode == 2 and cli.stdout == "", cli.stderr
    assert cli.stderr.startswith(f"error: cannot read {d / name}: ") and "listen" not in cli.stderr
    assert len(cli.stderr.strip().splitlines()) == 1 and "Traceback" not in cli.stderr


def test_an_unusable_port_still_says_it_cannot_listen(tmp_path):
    d = tmp_path / "d"
    write_dump(d, n=1, max_side=32)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        cli = subprocess.run([sys.executable, "-m", "pipeline.viewer", str(d), "--no-browser", "--port", port],
                             cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert cli.returncode == 2 and cli.stderr.startswith(f"error: cannot listen on 127.0.0.1:{port}: "), cli.stderr
    assert len(cli.stderr.strip().splitlines()) == 1
