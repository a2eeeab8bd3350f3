"""Every ``nnUNetv2_diffcl`` command given bad input: exit code 2, ``nnUNetv2_diffcl <command>: error: <message>``
on stderr, no traceback, and nothing written."""

from __future__ import annotations

import pytest

from nnunetv2_diffcl.cli import COMMANDS, main
from nnunetv2_diffcl.errors import UserInputError
from tests.conftest import command, run_captured

# command -> (arguments, a piece of the message); {tmp} is an empty folder, {missing} one that does not exist
BAD_INPUT = {
    "doctor": (["--quiet"], "unrecognized arguments: --quiet"),
    "preprocess_unlabeled": (["-d", "987"], "Dataset 987 not found"),
    "synthetic": (["--raw", "{tmp}", "-d", "5", "--labeled", "0"], "--labeled 0"),
    "demo": (["--out", "{missing}", "--epochs", "0"], "--epochs 0: give at least 1"),
    "predict_ensemble": (["-i", "{tmp}", "-o", "{missing}", "-d", "5", "--ddim_steps", "0"], "--ddim_steps 0"),
    "benchmark": (["-d", "5", "--repeats", "0"], "--repeats 0: give at least 1"),
    "evaluate": (["-ref", "{missing}", "-pred", "{tmp}"], "{missing}"),
    "convert_la": (["{missing}", "-d", "11", "--labeled", "2", "-o", "{tmp}"], "{missing}"),
    "convert_pancreas": (["{missing}", "-d", "12", "--labeled", "2", "-o", "{tmp}"], "{missing}"),
    "convert_brats": (["{missing}", "-d", "13", "--labeled", "2", "-o", "{tmp}"], "{missing}"),
    "self_training_round": (["-d", "5", "-t", "992", "--threshold", "1.5"], "--threshold 1.5: give a probability"),
}


def test_every_command_has_a_bad_input_case():
    assert set(BAD_INPUT) == set(COMMANDS)


@pytest.mark.parametrize("name", sorted(BAD_INPUT))
def test_bad_input_exits_2_with_the_message_and_writes_nothing(name, tmp_path, monkeypatch, capsys):
    tmp, missing = tmp_path / "empty", tmp_path / "missing"
    tmp.mkdir()
    for variable in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(variable, str(tmp))
    arguments, expected = BAD_INPUT[name]
    arguments = [a.format(tmp=tmp, missing=missing) for a in arguments]
    try:
        code = main([name, *arguments])
    except SystemExit as exit_:  # argparse's own refusal (its format is the one main uses)
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"nnUNetv2_diffcl {name}: error: " in err and expected.format(missing=missing) in err, err
    assert "Traceback" not in err
    assert not missing.exists() and not any(tmp.iterdir())  # nothing half-written


def test_the_console_script_prints_no_traceback(tmp_path):
    result = run_captured([command("nnUNetv2_diffcl"), "demo", "--out", str(tmp_path / "d"), "--epochs", "0"],
                          timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == "nnUNetv2_diffcl demo: error: --epochs 0: give at least 1"
    assert not (tmp_path / "d").exists()


def test_user_input_error_is_a_value_error():
    # callers that catch ValueError (the usual type for a bad value) keep working
    assert issubclass(UserInputError, ValueError)
