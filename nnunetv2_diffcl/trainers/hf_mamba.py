"""Supervised nnU-Net trainer whose network is the HF-Mamba CNN branch (CS) of Diff-CL.

Useful on its own (supervised baseline with HF-Mamba) and as the CS builder the Diff-CL trainer
shares. Everything except the network is nnU-Net's ``nnUNetTrainer``.
"""


import torch
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import nn

from nnunetv2_diffcl.network_architectures.cnn_branch import build_hf_mamba_network, saved_hf_mamba_expand
from nnunetv2_diffcl.trainers.schedule import ScheduleFromEnvironment


class HFMambaTrainer(ScheduleFromEnvironment):
    """nnUNetTrainer + HF-Mamba at the bottleneck (``hf_mamba_stages``) with ``hf_cutoff_ratio``.

    Options are class attributes (nnU-Net fixes the ``__init__`` signature); make a subclass to change
    them. ``build_network_architecture`` is a classmethod so it can read them: nnU-Net calls it on the
    instance in ``initialize`` and on the class in ``nnUNetv2_predict``, with the same arguments.
    """

    hf_mamba_stages: int = 1
    hf_cutoff_ratio: float = 0.25
    hf_mamba_expand: int = 2  # Mamba's inner width as a multiple of the stage's channels (mamba-ssm's expand)

    @classmethod
    def build_network_architecture(
        cls,
        plans_manager: PlansManager,
        configuration_manager: ConfigurationManager,
        num_input_channels: int,
        num_output_channels: int,
        enable_deep_supervision: bool = True,
    ) -> nn.Module:
        if not (isinstance(cls.hf_mamba_expand, int) and cls.hf_mamba_expand >= 1):
            raise ValueError(f"{cls.__name__}: hf_mamba_expand must be a whole number >= 1 (Mamba's inner width as a "
                             f"multiple of the bottleneck's channels), got {cls.hf_mamba_expand!r}")
        return build_hf_mamba_network(
            plans_manager,
            configuration_manager,
            num_input_channels,
            num_output_channels,
            enable_deep_supervision=enable_deep_supervision,
            hf_mamba_stages=cls.hf_mamba_stages,
            cutoff_ratio=cls.hf_cutoff_ratio,
            mamba_kwargs={"expand": cls.hf_mamba_expand},
        )

    def load_checkpoint(self, filename_or_checkpoint: str | dict) -> None:
        """nnU-Net's, after checking that the checkpoint's HF-Mamba has this trainer's inner width: resuming at
        another width would load weights the optimizer does not hold (the network would rebuild its layers)."""
        checkpoint = filename_or_checkpoint
        if not isinstance(checkpoint, dict):  # memory-mapped: only the shapes are read here
            checkpoint = torch.load(checkpoint, map_location="cpu", weights_only=False, mmap=True)
        network = self.network.module if self.is_ddp else self.network
        for i, module in enumerate(getattr(network, "hf_mamba", [])):
            saved = saved_hf_mamba_expand(checkpoint["network_weights"], i, module.channels)
            if saved is not None and saved != module.expand:
                name = filename_or_checkpoint if isinstance(filename_or_checkpoint, str) else "the checkpoint"
                raise RuntimeError(f"{name} holds HF-Mamba layers of inner width {saved}x their channels, "
                                   f"{self.__class__.__name__} builds {module.expand}x (hf_mamba_expand): resume "
                                   f"with a trainer whose hf_mamba_expand is {saved} (DiffCLTrainer models written "
                                   f"before 2026-12-06 have 2: DiffCLTrainer_hfExpand2), or start anew")
        super().load_checkpoint(filename_or_checkpoint)

    def _do_i_compile(self) -> bool:
        """Never compile: mamba-ssm's kernels are not registered with torch.compile."""
        return False
