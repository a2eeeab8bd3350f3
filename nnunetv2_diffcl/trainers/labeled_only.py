"""nnU-Net's own trainer on the labeled cases, with the plugin's schedule variables honoured.

The baseline every semi-supervised result is compared with: ``nnUNetTrainer`` unchanged, except that
``nnUNet_diffcl_epochs`` / ``_iterations`` / ``_val_iterations`` shorten its schedule exactly as they
shorten the semi-supervised trainers' (demo and benchmark use the same schedule for all).
"""

from __future__ import annotations

from nnunetv2_diffcl.trainers.schedule import ScheduleFromEnvironment


class LabeledOnlyTrainer(ScheduleFromEnvironment):
    """nnUNetTrainer on the labeled cases, nothing else changed: the reference every semi-supervised trainer must
    beat. Variants change nnUNetTrainer's own attributes, as nnU-Net's variants do."""
