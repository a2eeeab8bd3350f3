"""Supervised nnU-Net trainer whose network is the HF-Mamba CNN branch (CS) of Diff-CL.

Useful on its own (supervised baseline with HF-Mamba) and as the CS builder the Diff-CL trainer
shares. Everything except the network is nnU-Net's ``nnUNetTrainer``.
"""


from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import nn

from nnunetv2_diffcl.network_architectures.cnn_branch import build_hf_mamba_network
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

    def _do_i_compile(self) -> bool:
        """Never compile: mamba-ssm's kernels are not registered with torch.compile."""
        return False
