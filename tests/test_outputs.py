"""common/outputs.py on its own: what check_output refuses and what it leaves on disk before anything is written."""
from __future__ import annotations

import os

import pytest

from common.errors import OutputError
from common.outputs import AtomicOutput, check_output, leftover_temp_files


def test_a_refused_run_leaves_no_empty_folders(tmp_path):
    """check_output made the output's folders up front, so a run refused after it (a missing style image, an input
    that is not a video) left them behind; AtomicOutput makes them when it writes."""
    target = check_output(tmp_path / "new" / "deeper" / "out.mp4")
    assert target == tmp_path / "new" / "deeper" / "out.mp4" and not (tmp_path / "new").exists()
    with AtomicOutput(target) as temp:
        assert leftover_temp_files(target) == [temp]
        temp.write_bytes(b"frames")
    assert target.read_bytes() == b"frames" and not leftover_temp_files(target)


def test_a_file_in_the_way_of_the_folder_is_named(tmp_path):
    (tmp_path / "flat.mp4").write_text("")
    with pytest.raises(OutputError, match=f"cannot create output folder .*: {tmp_path / 'flat.mp4'} is a file"):
        check_output(tmp_path / "flat.mp4" / "sub" / "x.mp4")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders anyway")
def test_a_read_only_folder_is_refused_up_front(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    with pytest.raises(OutputError, match="permission denied"):
        check_output(locked / "new" / "out.mp4")
