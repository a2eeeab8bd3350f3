"""The package's layers: networks, losses, unlabeled data, dataset conversion and the diffusion maths never import
a trainer (trainers build on them, never the other way round)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "nnunetv2_diffcl"
LOWER_LAYERS = ["network_architectures", "losses", "unlabeled", "dataset_conversion", "evaluation", "diffusion.py",
                "diffusion_branch.py", "file_io.py", "self_training.py"]


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("layer", LOWER_LAYERS)
def test_lower_layers_never_import_a_trainer(layer):
    files = [PACKAGE / layer] if layer.endswith(".py") else sorted((PACKAGE / layer).rglob("*.py"))
    assert files and all(f.exists() for f in files), layer
    for path in files:
        trainers = {m for m in imported_modules(path) if m.startswith("nnunetv2_diffcl.trainers")}
        assert not trainers, f"{path.relative_to(PACKAGE)} imports {sorted(trainers)}"
