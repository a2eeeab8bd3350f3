"""Atomic writes: a reader sees the old file or the new one, never half of one, and a failure leaves no litter."""

from __future__ import annotations

import json
import math

import pytest

from nnunetv2_diffcl.file_io import write_json_atomic, write_text_atomic


@pytest.mark.parametrize("text", ["", "ascii\n", "± Dice über Fälle\n"])
def test_text_round_trip_in_utf8(tmp_path, text):
    target = tmp_path / "new" / "report.md"  # the folder is made
    write_text_atomic(text, target)
    assert target.read_bytes() == text.encode("utf-8")
    assert [p.name for p in target.parent.iterdir()] == ["report.md"]


def test_json_replaces_the_old_file_whole(tmp_path):
    target = tmp_path / "summary.json"
    write_json_atomic({"dice": 0.5}, target)
    write_json_atomic({"dice": 0.75, "hd95": None}, target)
    assert json.loads(target.read_text()) == {"dice": 0.75, "hd95": None}


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "summary.json"
    write_json_atomic({"dice": 0.5}, target)
    with pytest.raises(ValueError):  # NaN is not JSON: refused before anything replaces the old file
        write_json_atomic({"dice": math.nan}, target)
    assert json.loads(target.read_text()) == {"dice": 0.5}
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_a_write_failing_halfway_removes_its_temporary(tmp_path):
    target = tmp_path / "benchmark.md"
    write_text_atomic("old\n", target)
    with pytest.raises(UnicodeEncodeError):  # a lone surrogate fails while the temporary file is being written
        write_text_atomic("new table\n\ud800", target)
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["benchmark.md"]
