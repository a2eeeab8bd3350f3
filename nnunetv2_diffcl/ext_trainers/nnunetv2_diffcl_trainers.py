"""Re-exports the plugin's trainer classes for nnU-Net's trainer lookup (see trainer_discovery)."""

from nnunetv2_diffcl.trainers import PLUGIN_TRAINERS

globals().update({cls.__name__: cls for cls in PLUGIN_TRAINERS})
__all__ = [cls.__name__ for cls in PLUGIN_TRAINERS]
