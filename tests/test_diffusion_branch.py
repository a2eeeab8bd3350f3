"""DiffusionBranch: DS's denoiser, schedule and sampler in one object; old checkpoints load; widths scale."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunetv2_diffcl.diffusion_branch import DiffusionBranch, scaled_configuration
from tests.network_architectures.plans import PLAIN, make_configuration, make_plans

# written on 2026-12-04 by the code before DiffusionBranch existed (build_denoiser on these tiny plans, weights
# jittered so the FiLM layers are not zero), with one probe input and the output it gave
OLD_CHECKPOINT = Path(__file__).parent / "assets" / "ds_checkpoint_before_diffusion_branch.pth"


def tiny_plans(dim: int = 2, features: tuple[int, ...] = (4, 8)) -> PlansManager:
    return PlansManager(make_plans({f"{dim}d": make_configuration(dim, PLAIN, features, [16] * dim)}))


def tiny_branch(dim: int = 2, width: float = 1.0, **settings) -> DiffusionBranch:
    plans = tiny_plans(dim)
    return DiffusionBranch.from_plans(plans, plans.get_configuration(f"{dim}d"), 1, 3, deep_supervision=False,
                                      device="cpu", width_fraction=width, **settings)


def test_checkpoint_written_before_the_branch_loads_and_computes_the_same():
    checkpoint = torch.load(OLD_CHECKPOINT, map_location="cpu", weights_only=False)
    branch = tiny_branch()
    branch.denoiser.load_state_dict(checkpoint["semi_supervised"]["networks"]["ds"])  # strict: same keys
    branch.denoiser.eval()
    probe = checkpoint["probe"]
    with torch.no_grad():
        out = branch.denoiser(probe["image"], probe["x_t"], probe["t"])
    torch.testing.assert_close(out, probe["output"])


@pytest.mark.parametrize("dim", [2, 3])
def test_denoise_and_sample_shapes(dim):
    torch.manual_seed(0)
    branch = tiny_branch(dim, timesteps=50, ddim_steps=3)
    images = torch.randn(2, 1, *[16] * dim)
    labels = torch.randint(0, 3, (2, 1, *[16] * dim))
    assert branch.denoise(images, labels).shape == (2, 3, *[16] * dim)
    logits = branch.sample_logits(images)
    assert logits.shape == (2, 3, *[16] * dim) and not logits.requires_grad
    label = branch.sample_label(images)
    assert label.shape == (2, 1, *[16] * dim) and int(label.max()) < 3


def test_sampling_uses_the_requested_number_of_steps():
    branch = tiny_branch(timesteps=50, ddim_steps=4)
    calls = []
    denoiser = branch.denoiser
    branch.denoiser = lambda image, x_t, t: calls.append(int(t[0])) or denoiser(image, x_t, t)
    branch.sample_logits(torch.randn(1, 1, 16, 16))
    assert calls == [49, 33, 16, 0]
    calls.clear()
    branch.sample_logits(torch.randn(1, 1, 16, 16), steps=2)  # the diagnostics' other step counts
    assert calls == [49, 0] and branch.ddim_steps == 4


def test_noised_label_keeps_the_signal_scale():
    branch = tiny_branch(timesteps=1000, signal_scale=0.1)
    label = torch.tensor([[[[0, 2]]]])
    x_t, t = branch.noised(label, t=torch.tensor([0]))
    # at t = 0 (abar = 1 - 1e-4) the input is the scaled one-hot signal plus 1 % of the noise's sd
    expected = 0.1 * torch.tensor([[1.0, -1.0], [-1.0, -1.0], [-1.0, 1.0]])[None, :, None, :]
    torch.testing.assert_close(x_t, expected, atol=0.06, rtol=0)
    assert t.tolist() == [0]


def test_width_fraction_scales_every_stage():
    plans = tiny_plans(features=(8, 16, 32))
    half = scaled_configuration(plans.get_configuration("2d"), 0.5)
    assert half.network_arch_init_kwargs["features_per_stage"] == [4, 8, 16]
    assert plans.get_configuration("2d").network_arch_init_kwargs["features_per_stage"] == [8, 16, 32]  # untouched
    assert tiny_branch(width=0.5).denoiser.encoder.output_channels == [2, 4]
    full = sum(p.numel() for p in tiny_branch().denoiser.parameters())
    assert sum(p.numel() for p in tiny_branch(width=0.5).denoiser.parameters()) < full / 2


@pytest.mark.parametrize("width", [0.0, -0.5, 1.5])
def test_bad_width_is_refused(width):
    with pytest.raises(ValueError, match=r"width_fraction must lie in \(0, 1\]"):
        scaled_configuration(tiny_plans().get_configuration("2d"), width)
