"""Noise schedules, forward noising and DDIM sampling of the DS branch (nnunetv2_diffcl.diffusion)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from nnunetv2_diffcl.diffusion import (
    DDIMSampler,
    NoiseSchedule,
    cosine_alpha_bar,
    label_map_to_signal,
    labels_to_signal,
    logits_to_signal,
    q_sample,
    sample_timesteps,
)

KINDS = ["linear", "cosine"]
K = 3


# ----------------------------------------------------------------------------------------------- schedules
def test_linear_betas_endpoints() -> None:
    s = NoiseSchedule(1000, "linear")
    assert s.betas.shape == (1000,) and s.betas.dtype == torch.float32
    assert s.betas[0].item() == pytest.approx(1e-4, rel=1e-6)
    assert s.betas[-1].item() == pytest.approx(0.02, rel=1e-6)
    assert torch.all(s.betas[1:] > s.betas[:-1])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("num_timesteps", [1000, 200])
def test_alphas_cumprod_shape_and_monotone(kind: str, num_timesteps: int) -> None:
    s = NoiseSchedule(num_timesteps, kind)
    abar = s.alphas_cumprod
    assert abar.shape == (num_timesteps,) and abar.dtype == torch.float32
    assert torch.all(abar[1:] < abar[:-1]), "alpha-bar must be strictly decreasing"
    assert torch.all((s.betas > 0) & (s.betas <= 0.999))
    # float64 product, so the stored values match the float64 cumprod to float32 precision
    torch.testing.assert_close(abar.double(), torch.cumprod(1 - s.betas.double(), 0), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind", KINDS)
def test_alpha_bar_endpoints(kind: str) -> None:
    """T = 1000: abar_0 > 0.999 (almost clean), abar_{T-1} < 1e-3 (almost pure noise)."""
    abar = NoiseSchedule(1000, kind).alphas_cumprod
    assert abar[0].item() > 0.999
    assert abar[-1].item() < 1e-3


@pytest.mark.parametrize("t", [0, 1, 100, 500, 900, 998])
def test_cosine_matches_closed_form(t: int) -> None:
    """abar[t] = f(t+1)/f(0) with f(u) = cos^2(((u/T + s)/(1 + s)) pi/2), s = 0.008 (unclipped steps)."""
    T, s = 1000, 0.008
    expected = math.cos(((t + 1) / T + s) / (1 + s) * math.pi / 2) ** 2 / math.cos(s / (1 + s) * math.pi / 2) ** 2
    got = NoiseSchedule(T, "cosine").alphas_cumprod[t].item()
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-9)
    assert cosine_alpha_bar(torch.tensor(float(t + 1)), T).item() == pytest.approx(expected, rel=1e-12)


def test_cosine_last_beta_is_clipped() -> None:
    assert NoiseSchedule(1000, "cosine").betas[-1].item() == pytest.approx(0.999, rel=1e-6)


def test_bad_kind_raises() -> None:
    with pytest.raises(ValueError, match="linear.*cosine"):
        NoiseSchedule(1000, "quadratic")


def test_schedule_moves_but_is_not_saved() -> None:
    s = NoiseSchedule(10).to(torch.device("cpu"))
    assert s.alphas_cumprod.device.type == "cpu"
    assert s.state_dict() == {}  # derived from (T, kind): nothing to checkpoint


# ----------------------------------------------------------------------------------------------- signals
@pytest.mark.parametrize("spatial", [(5, 6), (3, 4, 5)], ids=["2d", "3d"])
@pytest.mark.parametrize("dtype", [torch.long, torch.int16, torch.float32])
def test_label_map_to_signal(spatial: tuple[int, ...], dtype: torch.dtype) -> None:
    labels = torch.randint(0, K, (2, 1, *spatial))
    signal = label_map_to_signal(labels.to(dtype), K)
    assert signal.shape == (2, K, *spatial) and signal.dtype == torch.float32
    assert set(signal.unique().tolist()) <= {-1.0, 1.0}
    onehot = (signal + 1) / 2
    torch.testing.assert_close(onehot.sum(1), torch.ones(2, *spatial))  # exactly one class per voxel
    torch.testing.assert_close(onehot.argmax(1), labels[:, 0])
    torch.testing.assert_close(labels_to_signal(onehot), signal)


@pytest.mark.parametrize("bad", [-1, K])
def test_label_map_out_of_range_raises(bad: int) -> None:
    labels = torch.zeros(1, 1, 4, 4, dtype=torch.long)
    labels[0, 0, 1, 1] = bad
    with pytest.raises(ValueError, match="label values"):
        label_map_to_signal(labels, K)


def test_label_map_needs_channel_axis() -> None:
    with pytest.raises(ValueError, match=r"\(B, 1"):
        label_map_to_signal(torch.zeros(2, 4, 4, dtype=torch.long), K)


def test_logits_to_signal_range() -> None:
    signal = logits_to_signal(torch.randn(2, K, 4, 4) * 5)
    assert signal.min() >= -1 and signal.max() <= 1
    torch.testing.assert_close(signal.sum(1), torch.full((2, 4, 4), 2.0 - K))  # probabilities sum to one


# ----------------------------------------------------------------------------------------------- q_sample
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("step", [10, 300, 999])
def test_q_sample_statistics(kind: str, step: int) -> None:
    """20000 samples per voxel: mean within 0.03 of sqrt(abar) x0, std within 3% of sqrt(1 - abar)."""
    s = NoiseSchedule(1000, kind)
    n = 20000
    x0 = torch.tensor([-1.0, 1.0]).reshape(1, 2, 1).expand(n, 2, 1)
    t = torch.full((n,), step, dtype=torch.long)
    g = torch.Generator().manual_seed(0)
    xt = q_sample(s, x0, t, torch.randn(x0.shape, generator=g))
    abar = s.alphas_cumprod[step].item()
    torch.testing.assert_close(xt.mean(0).flatten(), torch.tensor([-1.0, 1.0]) * math.sqrt(abar), rtol=0, atol=0.03)
    torch.testing.assert_close(xt.std(0).flatten(), torch.full((2,), math.sqrt(1 - abar)), rtol=0.03, atol=1e-3)


def test_q_sample_per_sample_timesteps_and_t0() -> None:
    s = NoiseSchedule(1000, "linear")
    x0 = label_map_to_signal(torch.randint(0, K, (4, 1, 8, 8)), K)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0, 0, 999, 500])
    xt = q_sample(s, x0, t, noise)
    assert xt.shape == x0.shape
    torch.testing.assert_close(xt[:2], x0[:2], rtol=0, atol=0.05)  # t = 0: noise std sqrt(1e-4) = 0.01, 5 sigma
    for i in (2, 3):
        abar = s.alphas_cumprod[t[i]]
        torch.testing.assert_close(xt[i], abar.sqrt() * x0[i] + (1 - abar).sqrt() * noise[i])


def test_q_sample_rejects_bad_t() -> None:
    with pytest.raises(ValueError, match="t must have shape"):
        q_sample(NoiseSchedule(10), torch.zeros(2, K, 4), torch.zeros(3, dtype=torch.long))


def test_sample_timesteps_uniform_range() -> None:
    g = torch.Generator().manual_seed(0)
    t = sample_timesteps(50000, 10, generator=g, device="cpu")
    assert t.dtype == torch.long and t.shape == (50000,)
    assert t.min() == 0 and t.max() == 9
    counts = torch.bincount(t, minlength=10).float() / t.numel()
    torch.testing.assert_close(counts, torch.full((10,), 0.1), rtol=0, atol=0.01)
    again = sample_timesteps(50000, 10, generator=torch.Generator().manual_seed(0))
    assert torch.equal(t, again)


# ----------------------------------------------------------------------------------------------- DDIM
class RecordingModel(torch.nn.Module):
    """A tiny conv denoiser that records the timesteps it is called with."""

    def __init__(self, dim: int, image_channels: int = 1, num_classes: int = K, deep_supervision: bool = False):
        super().__init__()
        conv = torch.nn.Conv2d if dim == 2 else torch.nn.Conv3d
        self.conv = conv(image_channels + num_classes, num_classes, 3, padding=1)
        self.deep_supervision = deep_supervision
        self.calls: list[torch.Tensor] = []

    def forward(self, image: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        self.calls.append(t.clone())
        out = self.conv(torch.cat([image, x_t], 1)) + t.float().reshape(-1, *[1] * (image.ndim - 1)) / 1000
        return [out, out[:, :, ::2]] if self.deep_supervision else out


SPATIAL = [(8, 8), (4, 6, 6)]


@pytest.mark.parametrize("spatial", SPATIAL, ids=["2d", "3d"])
@pytest.mark.parametrize("deep_supervision", [False, True])
def test_ddim_output_shape(spatial: tuple[int, ...], deep_supervision: bool) -> None:
    model = RecordingModel(len(spatial), deep_supervision=deep_supervision)
    image = torch.randn(2, 1, *spatial)
    out = DDIMSampler(NoiseSchedule(1000), num_steps=4).sample(model, image, K)
    assert isinstance(out, torch.Tensor)
    assert out.shape == (2, K, *spatial) and out.dtype == torch.float32


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_ddim_seeded_generator_is_deterministic(kind: str, eta: float) -> None:
    model = RecordingModel(2)
    image = torch.randn(2, 1, 8, 8)
    sampler = DDIMSampler(NoiseSchedule(1000, kind), num_steps=5, eta=eta)
    a = sampler.sample(model, image, K, generator=torch.Generator().manual_seed(1))
    b = sampler.sample(model, image, K, generator=torch.Generator().manual_seed(1))
    c = sampler.sample(model, image, K, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_ddim_stochastic_eta_uses_extra_noise() -> None:
    """Same start noise (same seed) but eta > 0 adds fresh noise at every step: results differ from eta = 0."""
    model = RecordingModel(2)
    image = torch.randn(1, 1, 8, 8)
    schedule = NoiseSchedule(1000)
    a = DDIMSampler(schedule, 5, eta=0.0).sample(model, image, K, generator=torch.Generator().manual_seed(0))
    b = DDIMSampler(schedule, 5, eta=1.0).sample(model, image, K, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("num_steps, num_timesteps", [(10, 1000), (1, 1000), (2, 1000), (7, 50), (50, 50)])
def test_ddim_calls_model_once_per_step_descending(num_steps: int, num_timesteps: int) -> None:
    model = RecordingModel(2)
    image = torch.randn(3, 1, 4, 4)
    DDIMSampler(NoiseSchedule(num_timesteps), num_steps).sample(model, image, K)
    assert len(model.calls) == num_steps
    for t in model.calls:
        assert t.shape == (3,) and t.dtype == torch.long and bool((t == t[0]).all())
    steps = [int(t[0]) for t in model.calls]
    assert steps[0] == num_timesteps - 1
    if num_steps > 1:
        assert steps[-1] == 0
    assert all(a > b for a, b in zip(steps, steps[1:])), steps
    if num_steps == num_timesteps:
        assert steps == list(range(num_timesteps - 1, -1, -1))


def test_ddim_puts_nothing_in_autograd() -> None:
    model = RecordingModel(2)
    assert all(p.requires_grad for p in model.parameters())
    out = DDIMSampler(NoiseSchedule(100), 3).sample(model, torch.randn(1, 1, 4, 4, requires_grad=True), K)
    assert not out.requires_grad and out.grad_fn is None
    assert all(p.grad is None for p in model.parameters())
    assert torch.is_grad_enabled()  # no_grad does not leak out


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("num_steps", [1, 3, 10])
@pytest.mark.parametrize("spatial", SPATIAL, ids=["2d", "3d"])
def test_ddim_oracle_recovers_label(kind: str, num_steps: int, spatial: tuple[int, ...]) -> None:
    """A model that always predicts the true label yields it, and the trajectory lands on its signal."""
    labels = torch.randint(0, K, (2, *spatial))
    onehot = F.one_hot(labels, K).movedim(-1, 1).float()
    seen: list[torch.Tensor] = []

    def oracle(image: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        seen.append(x_t)
        return 10 * onehot

    out = DDIMSampler(NoiseSchedule(1000, kind), num_steps).sample(oracle, torch.zeros(2, 1, *spatial), K)
    assert torch.equal(out.argmax(1), labels)
    assert torch.equal(seen[-1].argmax(1), labels) or num_steps == 1  # x_t at t = 0 is nearly the clean label


def test_ddim_first_input_is_standard_normal() -> None:
    seen: list[torch.Tensor] = []

    def model(image: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        seen.append(x_t)
        return torch.zeros_like(x_t)

    DDIMSampler(NoiseSchedule(1000), 2).sample(model, torch.zeros(4, 1, 32, 32), K, torch.Generator().manual_seed(0))
    x_T = seen[0]
    assert abs(x_T.mean().item()) < 0.05 and abs(x_T.std().item() - 1) < 0.05


@pytest.mark.parametrize("num_steps", [0, -1, 101])
def test_ddim_bad_num_steps_raises(num_steps: int) -> None:
    with pytest.raises(ValueError, match=r"number of DDIM steps must lie in \[1, 100\]"):
        DDIMSampler(NoiseSchedule(100), num_steps)


def test_ddim_negative_eta_raises() -> None:
    with pytest.raises(ValueError, match="eta"):
        DDIMSampler(NoiseSchedule(100), 5, eta=-0.1)
