"""Benchmark converters (LA, NIH pancreas, BraTS 2019) into nnU-Net raw format with labeled,
unlabeled and test subsets; each module exposes ``configure_parser(parser)`` and ``run(args)``."""

from nnunetv2_diffcl.dataset_conversion.converters import brats, la, pancreas

CONVERTERS = {"convert_la": la, "convert_pancreas": pancreas, "convert_brats": brats}

__all__ = ["CONVERTERS", "brats", "la", "pancreas"]
