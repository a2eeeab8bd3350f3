"""nnU-Net's own trainer on the labeled cases, with the plugin's schedule variables honoured.

The baseline every semi-supervised result is compared with: ``nnUNetTrainer`` unchanged, except that
``nnUNet_diffcl_epochs`` / ``_iterations`` / ``_val_iterations`` shorten its schedule exactly as they
shorten the semi-supervised trainers' (demo and benchmark use the same schedule for all).
"""

from __future__ import annotations

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunetv2_diffcl.trainers.semi_supervised import apply_schedule_overrides


class LabeledOnlyTrainer(nnUNetTrainer):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        apply_schedule_overrides(self)
