"""The plugin's trainers. ``PLUGIN_TRAINERS`` is the one list nnU-Net's lookup and ``doctor`` use."""

from nnunetv2_diffcl.trainers.cps import CPSTrainer
from nnunetv2_diffcl.trainers.diffcl import (
    DiffCLTrainer,
    DiffCLTrainer_DDIM1,
    DiffCLTrainer_DDIM3,
    DiffCLTrainer_DDIM5,
    DiffCLTrainer_DDIM20,
    DiffCLTrainer_noContrastive,
    DiffCLTrainer_noDiffusion,
    DiffCLTrainer_noHFMamba,
)
from nnunetv2_diffcl.trainers.hf_mamba import HFMambaTrainer
from nnunetv2_diffcl.trainers.labeled_only import LabeledOnlyTrainer

PLUGIN_TRAINERS: list = [
    LabeledOnlyTrainer,
    HFMambaTrainer,
    CPSTrainer,
    DiffCLTrainer,
    DiffCLTrainer_noHFMamba,
    DiffCLTrainer_noContrastive,
    DiffCLTrainer_noDiffusion,
    DiffCLTrainer_DDIM1,
    DiffCLTrainer_DDIM3,
    DiffCLTrainer_DDIM5,
    DiffCLTrainer_DDIM20,
]

__all__ = ["PLUGIN_TRAINERS"] + [cls.__name__ for cls in PLUGIN_TRAINERS]
