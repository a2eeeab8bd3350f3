#!/usr/bin/env bash
# The tests: installs into ./.venv if needed (with mamba-ssm's Python part for the parity test),
# prints the versions the tests ran with, checks style, runs pytest.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIFFCL_WITH_MAMBA_SSM=1 bash "$REPO/scripts/setup_env.sh"
cd "$REPO"
.venv/bin/python - <<'PY'
import importlib.metadata as m, torch
print("torch", torch.__version__, "| nnunetv2", m.version("nnunetv2"), "| cuda available:", torch.cuda.is_available())
assert m.version("nnunetv2").startswith("2.8."), "the plugin is written for nnunetv2 2.8"
PY
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@" tests
