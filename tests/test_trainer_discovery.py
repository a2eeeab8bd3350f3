"""nnU-Net finds the plugin's trainers after installation, with no manual export."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest

from nnunetv2_diffcl import trainer_discovery
from nnunetv2_diffcl.trainers import PLUGIN_TRAINERS
from tests.conftest import command, run_captured

REPO = Path(__file__).resolve().parents[1]
LOOKUP = ("import os\nfrom nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as find\n"
          "for name in {names!r}:\n    cls = find(name)\n    print('FOUND', name, cls.__module__)\n"
          "print('VAR', os.environ.get('nnUNet_extTrainer'))\n")


def fresh_python(code: str, env_changes: dict[str, str | None]) -> subprocess.CompletedProcess:
    """A new interpreter, as a new shell would start it: only the startup hook can set the variable."""
    env = {k: v for k, v in os.environ.items() if k != trainer_discovery.ENV_VAR}
    for key, value in env_changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    # run outside the source tree, so the package is imported through its installation
    return run_captured([sys.executable, "-c", code], env=env, cwd=tempfile.gettempdir())


def test_register_appends_once_and_keeps_user_entries():
    env = {trainer_discovery.ENV_VAR: "/user/trainers"}
    assert trainer_discovery.register(env) is True
    assert env[trainer_discovery.ENV_VAR] == os.pathsep.join(["/user/trainers", trainer_discovery.EXT_TRAINER_DIR])
    assert trainer_discovery.register(env) is False
    assert env[trainer_discovery.ENV_VAR].count(trainer_discovery.EXT_TRAINER_DIR) == 1
    empty: dict[str, str] = {}
    trainer_discovery.register(empty)
    assert empty[trainer_discovery.ENV_VAR] == trainer_discovery.EXT_TRAINER_DIR


def test_discovery_folder_holds_only_small_reexport_modules():
    modules = sorted(p.name for p in Path(trainer_discovery.EXT_TRAINER_DIR).glob("*.py"))
    assert modules == ["__init__.py", "nnunetv2_diffcl_trainers.py"]


def test_fresh_interpreter_finds_every_trainer_with_the_variable_unset():
    names = [cls.__name__ for cls in PLUGIN_TRAINERS]
    assert len(set(names)) == len(names), "PLUGIN_TRAINERS lists a trainer twice"
    result = fresh_python(LOOKUP.format(names=names), {})
    assert result.returncode == 0, result.stderr
    for cls in PLUGIN_TRAINERS:
        assert f"FOUND {cls.__name__} {cls.__module__}" in result.stdout
    assert f"VAR {trainer_discovery.EXT_TRAINER_DIR}" in result.stdout


def test_user_setting_is_kept():
    result = fresh_python(LOOKUP.format(names=["CPSTrainer"]), {trainer_discovery.ENV_VAR: "/somewhere/else"})
    assert result.returncode == 0, result.stderr
    assert f"VAR /somewhere/else{os.pathsep}{trainer_discovery.EXT_TRAINER_DIR}" in result.stdout


def test_doctor_passes_in_a_fresh_shell():
    env = {k: v for k, v in os.environ.items() if k != trainer_discovery.ENV_VAR}
    result = run_captured([command("nnUNetv2_diffcl"), "doctor"], env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "nnunetv2          2.8" in result.stdout and "torch" in result.stdout
    for cls in PLUGIN_TRAINERS:
        assert re.search(rf"trainer {cls.__name__}\s+found", result.stdout)


def test_doctor_fails_with_instructions_when_not_registered():
    env = {k: v for k, v in os.environ.items() if k != trainer_discovery.ENV_VAR}
    env["nnUNet_diffcl_no_autoregister"] = "1"
    result = run_captured([command("nnUNetv2_diffcl"), "doctor"], env=env)
    assert result.returncode == 1
    assert "NOT found" in result.stdout and f"export {trainer_discovery.ENV_VAR}=" in result.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(REPO)], check=True, capture_output=True, timeout=600)
    return next(out.glob("nnunetv2_diffcl-*.whl"))


def test_wheel_carries_both_startup_files(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        assert {"nnunetv2_diffcl.pth", "nnunetv2_diffcl.start"} <= names
        pth = z.read("nnunetv2_diffcl.pth").decode()
        start = z.read("nnunetv2_diffcl.start").decode()
    assert pth.startswith("import ") and "trainer_discovery" in pth
    assert start.strip() == "nnunetv2_diffcl.trainer_discovery:startup"


def test_plain_install_registers_on_startup(wheel, tmp_path):
    """``pip install`` of the wheel into a site directory: its .pth runs when that directory is added."""
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=600)
    code = ("import os, site, sys\nsite.addsitedir(sys.argv[1])\nimport nnunetv2_diffcl\n"
            "print('VAR', os.environ.get('nnUNet_extTrainer'))\nprint('PKG', nnunetv2_diffcl.__file__)\n")
    # -S: the test environment's own site-packages (with its editable install) is not processed
    # and the working directory (first on sys.path with -c) is not the source tree
    result = run_captured([sys.executable, "-S", "-c", code, str(target)], cwd=tmp_path,
                          env={k: v for k, v in os.environ.items() if k != trainer_discovery.ENV_VAR})
    assert result.returncode == 0, result.stderr
    assert f"VAR {target / 'nnunetv2_diffcl' / 'ext_trainers'}" in result.stdout
    assert f"PKG {target / 'nnunetv2_diffcl' / '__init__.py'}" in result.stdout


@pytest.mark.parametrize("cls", PLUGIN_TRAINERS, ids=lambda c: c.__name__)
def test_every_trainer_says_what_it_is(cls):
    # a class docstring is not inherited: each trainer (and variant) must carry its own
    assert cls.__dict__.get("__doc__") and len(cls.__doc__.split()) >= 5, cls.__name__
