"""Hand-written nnU-Net plans (as ExperimentPlanner writes them) for small test networks."""

from __future__ import annotations

from collections.abc import Sequence

PLAIN = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
RESENC = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
REQ_IMPORT = ["conv_op", "norm_op", "dropout_op", "nonlin"]


def make_configuration(dim: int, arch: str, features: Sequence[int], patch: Sequence[int], channels: int = 1,
                       blocks_per_stage: Sequence[int] | None = None) -> dict:
    """One planned configuration: len(features) stages, stride 2 after the first, instance norm."""
    n_stages = len(features)
    arch_kwargs = {
        "n_stages": n_stages,
        "features_per_stage": list(features),
        "conv_op": f"torch.nn.modules.conv.Conv{dim}d",
        "kernel_sizes": [[3] * dim] * n_stages,
        "strides": [[1] * dim] + [[2] * dim] * (n_stages - 1),
        "n_conv_per_stage_decoder": [1] * (n_stages - 1),
        "conv_bias": True,
        "norm_op": f"torch.nn.modules.instancenorm.InstanceNorm{dim}d",
        "norm_op_kwargs": {"eps": 1e-05, "affine": True},
        "dropout_op": None,
        "dropout_op_kwargs": None,
        "nonlin": "torch.nn.LeakyReLU",
        "nonlin_kwargs": {"inplace": True},
    }
    if arch == PLAIN:
        arch_kwargs["n_conv_per_stage"] = [2] * n_stages
    else:
        arch_kwargs["n_blocks_per_stage"] = list(blocks_per_stage or [1] + [2] * (n_stages - 1))
    return {
        "data_identifier": f"nnUNetPlans_{dim}d",
        "preprocessor_name": "DefaultPreprocessor",
        "batch_size": 2,
        "patch_size": list(patch),
        "median_image_size_in_voxels": [40] * dim,
        "spacing": [1.0] * dim,
        "normalization_schemes": ["ZScoreNormalization"] * channels,
        "use_mask_for_norm": [False] * channels,
        "resampling_fn_data": "resample_data_or_seg_to_shape",
        "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
        "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None},
        "architecture": {"network_class_name": arch, "arch_kwargs": arch_kwargs, "_kw_requires_import": REQ_IMPORT},
        "batch_dice": False,
    }


def make_plans(configurations: dict[str, dict], intensity_properties: dict | None = None) -> dict:
    """Plans holding the given configurations (e.g. {"2d": ..., "3d_fullres": ...})."""
    return {
        "dataset_name": "Dataset991_DiffCLSynthetic",
        "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": [1.0, 1.0, 1.0],
        "original_median_shape_after_transp": [40, 40, 40],
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "configurations": configurations,
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": intensity_properties or {},
    }
