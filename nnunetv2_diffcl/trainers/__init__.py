"""The plugin's trainers. ``PLUGIN_TRAINERS`` is the one list nnU-Net's lookup and ``doctor`` use."""

from nnunetv2_diffcl.trainers.cps import (
    CPSTrainer,
    CPSTrainer_noConfidenceMask,
    CPSTrainer_noEMA,
    CPSTrainer_noPerturbation,
    CPSTrainer_noWarmup,
    CPSTrainer_original,
)
from nnunetv2_diffcl.trainers.diffcl import (
    DiffCLTrainer,
    DiffCLTrainer_DDIM1,
    DiffCLTrainer_DDIM3,
    DiffCLTrainer_DDIM5,
    DiffCLTrainer_DDIM10,
    DiffCLTrainer_DDIM20,
    DiffCLTrainer_dsLabeledOnly,
    DiffCLTrainer_dsScale01,
    DiffCLTrainer_halfUnlabeled,
    DiffCLTrainer_measuredTrust,
    DiffCLTrainer_noAgreement,
    DiffCLTrainer_noConfidenceMask,
    DiffCLTrainer_noContrastive,
    DiffCLTrainer_noDiffusion,
    DiffCLTrainer_noEMA,
    DiffCLTrainer_noHFMamba,
    DiffCLTrainer_noPerturbation,
    DiffCLTrainer_noWarmup,
    DiffCLTrainer_original,
    DiffCLTrainer_uncut,
)
from nnunetv2_diffcl.trainers.hf_mamba import HFMambaTrainer
from nnunetv2_diffcl.trainers.labeled_only import LabeledOnlyTrainer

PLUGIN_TRAINERS: list = [
    LabeledOnlyTrainer,
    HFMambaTrainer,
    CPSTrainer,
    CPSTrainer_noWarmup,
    CPSTrainer_noConfidenceMask,
    CPSTrainer_noPerturbation,
    CPSTrainer_noEMA,
    CPSTrainer_original,
    DiffCLTrainer,
    DiffCLTrainer_noHFMamba,
    DiffCLTrainer_noContrastive,
    DiffCLTrainer_noDiffusion,
    DiffCLTrainer_noWarmup,
    DiffCLTrainer_noConfidenceMask,
    DiffCLTrainer_noAgreement,
    DiffCLTrainer_noPerturbation,
    DiffCLTrainer_noEMA,
    DiffCLTrainer_dsScale01,
    DiffCLTrainer_measuredTrust,
    DiffCLTrainer_original,
    DiffCLTrainer_DDIM1,
    DiffCLTrainer_DDIM3,
    DiffCLTrainer_DDIM5,
    DiffCLTrainer_DDIM10,
    DiffCLTrainer_DDIM20,
    DiffCLTrainer_uncut,
    DiffCLTrainer_dsLabeledOnly,
    DiffCLTrainer_halfUnlabeled,
]

__all__ = ["PLUGIN_TRAINERS"] + [cls.__name__ for cls in PLUGIN_TRAINERS]
