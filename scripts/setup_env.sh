#!/usr/bin/env bash
# Creates ./.venv (once) and installs the plugin with everything the demo and the tests need.
# Sourced by run_demo.sh and run_tests.sh; safe to run again (pip skips what is installed).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
if [ ! -x "$REPO/.venv/bin/python" ]; then
  "$PY" -m venv "$REPO/.venv"
fi
VENV_PY="$REPO/.venv/bin/python"
"$VENV_PY" -m pip install -q --upgrade pip setuptools wheel
# torch comes through nnunetv2 (the registry's newest build; it runs on CPU-only machines too)
"$VENV_PY" -m pip install -q -e "$REPO[test]"
if [ "${DIFFCL_WITH_MAMBA_SSM:-0}" = "1" ]; then
  # mamba-ssm's Python part only (no CUDA build): the tests compare our Mamba layer with it on the CPU
  "$VENV_PY" -m pip install -q packaging
  MAMBA_FORCE_BUILD=TRUE MAMBA_SKIP_CUDA_BUILD=TRUE "$VENV_PY" -m pip install -q --no-build-isolation "mamba-ssm==2.3.2.post1"
fi
