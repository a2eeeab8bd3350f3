"""The plugin's trainers. ``PLUGIN_TRAINERS`` is the one list nnU-Net's lookup and ``doctor`` use."""

from nnunetv2_diffcl.trainers.cps import CPSTrainer
from nnunetv2_diffcl.trainers.labeled_only import LabeledOnlyTrainer

PLUGIN_TRAINERS: list = [LabeledOnlyTrainer, CPSTrainer]

__all__ = ["PLUGIN_TRAINERS", "CPSTrainer", "LabeledOnlyTrainer"]
