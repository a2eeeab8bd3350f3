"""The nnUNetv2_diffcl front: help, unknown commands, every command's own parser."""

from __future__ import annotations

import argparse
import importlib

import pytest

from nnunetv2_diffcl.cli import COMMANDS, main


def test_usage_lists_every_command(capsys):
    assert main([]) == 2
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS)
    assert main(["--help"]) == 0


def test_unknown_command(capsys):
    assert main(["trian"]) == 2
    assert "unknown command 'trian'" in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_each_command_module_has_the_hooks(name):
    module = importlib.import_module(COMMANDS[name][0])
    parser = argparse.ArgumentParser()
    module.configure_parser(parser)
    assert callable(module.run)
    with pytest.raises(SystemExit) as info:
        parser.parse_args(["--help"])
    assert info.value.code == 0


def test_synthetic_command_needs_a_raw_folder(monkeypatch, capsys, tmp_path):
    monkeypatch.delenv("nnUNet_raw", raising=False)
    assert main(["synthetic"]) == 1
    assert "nnUNet_raw is not set" in capsys.readouterr().err
    assert main(["synthetic", "--raw", str(tmp_path), "-d", "7", "--labeled", "1", "--unlabeled", "1", "--test", "0",
                 "--shape", "8", "8", "8"]) == 0
    assert (tmp_path / "Dataset007_DiffCLSynthetic" / "imagesTu" / "syn_001_0000.nii.gz").exists()
