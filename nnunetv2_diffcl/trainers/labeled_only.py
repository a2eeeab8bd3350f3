"""nnU-Net's own trainer on the labeled cases, with the plugin's schedule variables honoured.

The baseline every semi-supervised result is compared with: ``nnUNetTrainer`` unchanged, except that
``nnUNet_diffcl_epochs`` / ``_iterations`` / ``_val_iterations`` shorten its schedule exactly as they
shorten the semi-supervised trainers' (demo and benchmark use the same schedule for all).
"""

from __future__ import annotations

from typing import Any

import torch

from nnunetv2_diffcl.trainers.schedule import ScheduleFromEnvironment
from nnunetv2_diffcl.trainers.semi_supervised import BiasField, ClutterRestyle, SemiSupervisedTrainer, StrongRestyle


class LabeledOnlyTrainer(ScheduleFromEnvironment):
    """nnUNetTrainer on the labeled cases, nothing else changed: the reference every semi-supervised trainer must
    beat. Variants change nnUNetTrainer's own attributes, as nnU-Net's variants do."""


class LabeledOnlyTrainer_fourierLabeled(SemiSupervisedTrainer):
    """nnU-Net's supervised step on the labeled patches restyled by unlabeled patches as the semi-supervised
    trainers restyle them (``labeled_appearance``), nothing else: no pseudo-label, no second network. The control
    that says how much of a semi-supervised trainer's result comes from the unlabeled scans' appearance alone; this
    one with the Fourier restyle alone, ``LabeledOnlyTrainer_clutterRestyle`` with the trainers' default."""

    loss_terms = ("sup",)
    labeled_appearance = "fourier"

    def compute_losses(self, data: torch.Tensor, target: Any, data_u: torch.Tensor, weight: float
                       ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss = self.loss(self.network(data), target)
        return loss, {"sup": loss}


class LabeledOnlyTrainer_strongRestyle(StrongRestyle, LabeledOnlyTrainer_fourierLabeled):
    """The control for ``DiffCLTrainer_strongRestyle``: the same restyle, no pseudo-label."""


class LabeledOnlyTrainer_clutterRestyle(ClutterRestyle, LabeledOnlyTrainer_fourierLabeled):
    """The control for DiffCLTrainer's and CPSTrainer's labeled batch: the same restyle (with the clutter field), no
    pseudo-label."""


class LabeledOnlyTrainer_clutterGroundTruth(LabeledOnlyTrainer_clutterRestyle):
    """A further self-training round's trainer (``self_training.py``) with a quarter of the training patches from the
    ground-truth cases (``ground_truth_share``; a uniform draw gives them 4 of 52 on the benchmark). Measured (repeat
    3, 2000 steps): 0.678 against 0.702 with the uniform draw, more false positives in every domain, so not the
    command's suggestion (docs/benchmarks.md)."""

    ground_truth_share = 0.25


class LabeledOnlyTrainer_biasField(BiasField, LabeledOnlyTrainer_clutterRestyle):
    """The labeled batch under a bias field (``BiasField``) before DiffCL's restyle, no pseudo-label. Measured
    (repeat 1, 2000 steps): 0.613 against 0.627 without the field, domain 3's organ missed more (false negatives
    0.71 against 0.59), so no DiffCL variant was run with it (docs/benchmarks.md)."""
