#!/usr/bin/env bash
# The demo: installs into ./.venv if needed, then runs the whole workflow on synthetic data (CPU).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$REPO/scripts/setup_env.sh"
exec "$REPO/.venv/bin/nnUNetv2_diffcl" demo "$@"
