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
    assert main(["synthetic"]) == 2
    assert "nnUNetv2_diffcl synthetic: error: nnUNet_raw is not set" in capsys.readouterr().err
    assert main(["synthetic", "--raw", str(tmp_path), "-d", "7", "--labeled", "1", "--unlabeled", "1", "--test", "0",
                 "--shape", "8", "8", "8"]) == 0
    assert (tmp_path / "Dataset007_DiffCLSynthetic" / "imagesTu" / "syn_001_0000.nii.gz").exists()


def test_synthetic_domains_writes_the_benchmark_and_its_all_labeled_reference(capsys, tmp_path):
    assert main(["synthetic", "--raw", str(tmp_path), "--domains", "-d", "7", "--all-labeled-id", "8", "--labeled",
                 "1", "--unlabeled", "4", "--test", "1", "--shape", "8", "32", "32"]) == 0
    out = capsys.readouterr().out
    assert "Dataset007_DiffCLDomains" in out and "Dataset008_DiffCLDomainsAllLabeled" in out
    assert len(list((tmp_path / "Dataset008_DiffCLDomainsAllLabeled" / "labelsTr").iterdir())) == 5


@pytest.mark.parametrize("argv, defaults", [
    ([], (990, "DiffCLSynthetic", 4, 16, 6, (40, 40, 40))),
    (["--domains"], (993, "DiffCLDomains", 4, 48, 24, (16, 64, 64))),
    (["--domains", "--unlabeled", "8", "--shape", "8", "32", "32"], (993, "DiffCLDomains", 4, 8, 24, (8, 32, 32))),
])
def test_synthetic_defaults_depend_on_domains(argv, defaults):
    from nnunetv2_diffcl.dataset_conversion.synthetic_command import configure_parser, resolve_options

    parser = argparse.ArgumentParser()
    configure_parser(parser)
    options = resolve_options(parser.parse_args(argv))
    assert (options.dataset_id, options.name, options.labeled, options.unlabeled, options.test,
            options.shape) == defaults


@pytest.mark.parametrize("argv, message", [
    (["--unlabeled", "-1"], "--unlabeled -1: a number of cases cannot be negative"),
    (["--domains", "--test", "-2"], "--test -2: a number of cases cannot be negative"),
    (["--labeled", "0"], "--labeled 0: nnU-Net plans and trains on the labeled cases; give at least 1"),
    (["--domains", "--labeled", "0"], "--labeled 0"),
    (["--domains", "-d", "12", "--all-labeled-id", "12"], "--all-labeled-id 12 equals -d 12"),
    (["--domains", "--all-labeled-id", "993"], "--all-labeled-id 993 equals -d 993"),
    (["--all-labeled-id", "994"], "--all-labeled-id 994 needs --domains"),
    (["--domains", "--all-labeled-id", "1000"], "--all-labeled-id 1000: nnU-Net dataset ids are 1 to 999"),
    (["--shape", "0", "8", "8"], "--shape 0 8 8"),
])
def test_synthetic_refuses_bad_input_and_writes_nothing(argv, message, capsys, tmp_path):
    assert main(["synthetic", "--raw", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nnUNetv2_diffcl synthetic: error: ") and message in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []
