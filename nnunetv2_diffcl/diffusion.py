"""Label diffusion for the DS branch of Diff-CL: noise schedules, forward noising and DDIM sampling.

The diffused signal is the one-hot label map scaled to [-1, 1] (K channels). The denoiser predicts
the clean label as K logits (an "x0" parameterisation, as in GenericSSL), so DDIM turns its
softmax back into a [-1, 1] signal and derives the noise estimate from it. Schedules are computed
in float64 (the products over 1000 steps lose precision in float32) and stored in float32.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SCHEDULE_KINDS = ("linear", "cosine")

DenoiserFn = Callable[[Tensor, Tensor, Tensor], Tensor | Sequence[Tensor]]


def _linear_betas(num_timesteps: int) -> Tensor:
    """DDPM's linear schedule (Ho et al. 2020); the endpoints were chosen for T = 1000."""
    return torch.linspace(1e-4, 0.02, num_timesteps, dtype=torch.float64)


def cosine_alpha_bar(t: Tensor, num_timesteps: int, s: float = 0.008) -> Tensor:
    """Closed-form cumulative signal level of the cosine schedule at continuous step ``t`` (f(t)/f(0))."""

    def f(u: Tensor) -> Tensor:
        return torch.cos((u / num_timesteps + s) / (1 + s) * math.pi / 2) ** 2

    t = torch.as_tensor(t, dtype=torch.float64)
    return f(t) / f(torch.zeros((), dtype=torch.float64))


def _cosine_betas(num_timesteps: int, max_beta: float = 0.999) -> Tensor:
    """Nichol & Dhariwal's cosine schedule: betas from consecutive alpha-bar ratios, clipped at 0.999.

    The clip only bites at the last step, where alpha-bar would otherwise reach exactly zero.
    """
    steps = torch.arange(num_timesteps + 1, dtype=torch.float64)
    abar = cosine_alpha_bar(steps, num_timesteps)
    return (1 - abar[1:] / abar[:-1]).clamp(max=max_beta)


class NoiseSchedule(nn.Module):
    """Betas and cumulative alphas of a DDPM forward process with ``num_timesteps`` steps.

    ``alphas_cumprod[t]`` is the signal level after noising step t (t = 0..T-1), as in DDPM /
    guided-diffusion. The tensors are non-persistent buffers: ``.to(device)`` moves them, but they
    never end up in a checkpoint (they are fully determined by ``num_timesteps`` and ``kind``).
    """

    betas: Tensor
    alphas_cumprod: Tensor

    def __init__(self, num_timesteps: int = 1000, kind: str = "linear") -> None:
        super().__init__()
        if kind not in SCHEDULE_KINDS:
            raise ValueError(f"unknown noise schedule {kind!r}; valid kinds: {', '.join(SCHEDULE_KINDS)}")
        if num_timesteps < 1:
            raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
        self.num_timesteps = int(num_timesteps)
        self.kind = kind
        betas = _linear_betas(self.num_timesteps) if kind == "linear" else _cosine_betas(self.num_timesteps)
        alphas_cumprod = torch.cumprod(1 - betas, dim=0)
        self.register_buffer("betas", betas.float(), persistent=False)
        self.register_buffer("alphas_cumprod", alphas_cumprod.float(), persistent=False)

    def extra_repr(self) -> str:
        return f"num_timesteps={self.num_timesteps}, kind={self.kind!r}"


def labels_to_signal(onehot: Tensor) -> Tensor:
    """Map a {0, 1} one-hot label to the {-1, 1} signal that is diffused (zero-mean like the noise)."""
    return onehot.float() * 2 - 1


def label_map_to_signal(label_map: Tensor, num_classes: int) -> Tensor:
    """Turn an nnU-Net target ``(B, 1, *spatial)`` of class indices into the ``(B, K, *spatial)`` signal.

    nnU-Net's training targets hold class indices (possibly as floats); ignore labels must have been
    resolved before, so every value must lie in [0, K).
    """
    if label_map.ndim < 3 or label_map.shape[1] != 1:
        raise ValueError(f"expected a label map of shape (B, 1, *spatial), got {tuple(label_map.shape)}")
    labels = label_map[:, 0].long()
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"label values must lie in [0, {num_classes}), got range [{int(labels.min())}, {int(labels.max())}]"
        )
    onehot = F.one_hot(labels, num_classes).movedim(-1, 1)
    return labels_to_signal(onehot)


def logits_to_signal(logits: Tensor) -> Tensor:
    """Predicted x0 as a [-1, 1] signal: class probabilities (softmax over channels) scaled like labels."""
    return torch.softmax(logits.float(), dim=1) * 2 - 1


def _per_sample(values: Tensor, t: Tensor, like: Tensor) -> Tensor:
    """Gather ``values[t]`` and shape it (B, 1, 1, ...) to broadcast against ``like``."""
    out = values.to(like.device)[t.to(like.device).long()]
    return out.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


def q_sample(schedule: NoiseSchedule, x0: Tensor, t: Tensor, noise: Tensor | None = None) -> Tensor:
    """Noise ``x0`` to step ``t`` (one step per sample): sqrt(abar_t) x0 + sqrt(1 - abar_t) noise."""
    if t.ndim != 1 or t.shape[0] != x0.shape[0]:
        raise ValueError(f"t must have shape (B,) = ({x0.shape[0]},), got {tuple(t.shape)}")
    if noise is None:
        noise = torch.randn_like(x0)
    abar = _per_sample(schedule.alphas_cumprod, t, x0)
    return abar.sqrt() * x0 + (1 - abar).sqrt() * noise


def sample_timesteps(
    batch: int,
    num_timesteps: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Uniform training timesteps in {0, ..., T-1}, drawn on the generator's device and moved to ``device``."""
    draw_device = generator.device if generator is not None else device
    t = torch.randint(0, num_timesteps, (batch,), generator=generator, device=draw_device)
    return t.to(device) if device is not None else t


def _randn(shape: Sequence[int], generator: torch.Generator | None, device: torch.device) -> Tensor:
    """Gaussian noise from ``generator`` even when it lives on another device than the data."""
    draw_device = generator.device if generator is not None else device
    return torch.randn(tuple(shape), generator=generator, device=draw_device).to(device)


class DDIMSampler:
    """DDIM sampling (Song et al. 2021) of a label map from pure noise with ``num_steps`` model calls.

    The timesteps are spread evenly over [0, T-1] in descending order (T-1 first, 0 last; with one
    step only T-1). The model output at the last step (t = 0) is returned as the final x0 logits.
    ``eta = 0`` is the deterministic DDIM; ``eta = 1`` matches the DDPM posterior variance.
    ``signal_scale`` is the scale the label signal was trained at (x0 = scale * [-1, 1] label).
    """

    def __init__(self, schedule: NoiseSchedule, num_steps: int = 10, eta: float = 0.0,
                 signal_scale: float = 1.0) -> None:
        total = schedule.num_timesteps
        if not 1 <= num_steps <= total:
            raise ValueError(f"the number of DDIM steps must lie in [1, {total}] (the schedule's steps), got "
                             f"{num_steps}")
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        if not signal_scale > 0:
            raise ValueError(f"signal_scale must be > 0, got {signal_scale}")
        self.signal_scale = float(signal_scale)
        self.schedule = schedule
        self.num_steps = int(num_steps)
        self.eta = float(eta)
        self.timesteps = self._timesteps(total, self.num_steps)

    @staticmethod
    def _timesteps(total: int, num_steps: int) -> list[int]:
        # Spacing is >= 1 when num_steps <= total, so rounding never produces duplicates.
        grid = torch.linspace(total - 1, 0, num_steps, dtype=torch.float64).round().long()
        return grid.tolist()

    @torch.no_grad()
    def sample(
        self,
        model: DenoiserFn,
        image: Tensor,
        num_classes: int,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Run the reverse process for ``image`` and return the final x0 logits ``(B, K, *spatial)``."""
        device = image.device
        batch = image.shape[0]
        abar_all = self.schedule.alphas_cumprod.to(device=device, dtype=torch.float32)
        x_t = _randn((batch, num_classes, *image.shape[2:]), generator, device)
        logits = x_t  # replaced at the first step; keeps type checkers quiet
        for i, step in enumerate(self.timesteps):
            t = torch.full((batch,), step, dtype=torch.long, device=device)
            out = model(image, x_t, t)
            logits = out[0] if isinstance(out, list | tuple) else out
            if i == len(self.timesteps) - 1:
                break
            abar_t = abar_all[step]
            abar_prev = abar_all[self.timesteps[i + 1]]
            x0_hat = self.signal_scale * logits_to_signal(logits)
            eps_hat = (x_t - abar_t.sqrt() * x0_hat) / (1 - abar_t).sqrt()
            sigma = self.eta * ((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)).clamp(min=0).sqrt()
            direction = (1 - abar_prev - sigma**2).clamp(min=0).sqrt() * eps_hat
            x_t = abar_prev.sqrt() * x0_hat + direction
            if self.eta > 0:
                x_t = x_t + sigma * _randn(x_t.shape, generator, device)
        return logits
