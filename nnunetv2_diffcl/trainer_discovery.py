"""Make nnU-Net find the plugin's trainers without a manual ``export nnUNet_extTrainer=...``.

nnU-Net (>= 2.8) looks for trainers outside its own package only in the folders listed in the
environment variable ``nnUNet_extTrainer``. The installed startup files (``nnunetv2_diffcl.pth`` and,
for Python >= 3.15, ``nnunetv2_diffcl.start``) call :func:`startup` in every interpreter of the
environment, which appends this package's ``ext_trainers`` folder to that variable. This module must
stay import-light (standard library only): it runs at every Python start.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

ENV_VAR = "nnUNet_extTrainer"
EXT_TRAINER_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ext_trainers")


def _same_dir(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.normpath(os.path.abspath(a)) == os.path.normpath(os.path.abspath(b))


def is_registered(environ: MutableMapping[str, str] | None = None) -> bool:
    """Whether the plugin's discovery folder is listed in ``nnUNet_extTrainer``."""
    environ = os.environ if environ is None else environ
    return any(p.strip() and _same_dir(p, EXT_TRAINER_DIR) for p in environ.get(ENV_VAR, "").split(os.pathsep))


def register(environ: MutableMapping[str, str] | None = None) -> bool:
    """Append the discovery folder to ``nnUNet_extTrainer`` (idempotent, keeps the user's entries).

    Returns True when the variable was changed.
    """
    environ = os.environ if environ is None else environ
    if is_registered(environ):
        return False
    current = environ.get(ENV_VAR, "")
    entries = [p for p in current.split(os.pathsep) if p.strip()]
    environ[ENV_VAR] = os.pathsep.join(entries + [EXT_TRAINER_DIR])
    return True


def startup() -> None:
    """Entry point of the startup files. Never raises: a broken hook must not break Python."""
    if os.environ.get("nnUNet_diffcl_no_autoregister", "").lower() in ("1", "true", "yes"):
        return
    try:
        register()
    except Exception:  # noqa: BLE001 - startup code must not take the interpreter down
        pass
