"""A strong appearance perturbation of the student's unlabeled input (the "strong" view of a weak/strong split).

The teacher labels the unlabeled patch as nnU-Net's augmentation left it; the student must give the same labels
after its appearance has changed the way scanners and protocols change it: a gamma curve, contrast and
brightness, Gaussian noise and blur, drawn per sample. Geometry is untouched, so the teacher's labels stay
valid voxel for voxel. Dimension-agnostic (2d and 3d patches), on any device.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def uniform_draws(low: float, high: float, n: int, generator: torch.Generator | None, device: torch.device
                  ) -> torch.Tensor:
    """``n`` draws of U(low, high) on ``device`` (the generator may live on another device)."""
    draw = torch.rand(n, generator=generator, device=generator.device if generator is not None else device)
    return (low + (high - low) * draw).to(device)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur of (B, C, *spatial) with one sigma (in voxels) per sample; sigma 0 leaves it."""
    spatial = x.ndim - 2
    radius = max(1, math.ceil(3 * float(sigma.max())))
    offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    weights = torch.exp(-offsets[None] ** 2 / (2 * sigma[:, None].to(x.dtype).clamp_min(1e-6) ** 2))
    weights = weights / weights.sum(1, keepdim=True)
    weights[sigma <= 0] = (offsets == 0).to(x.dtype)
    batch, channels = x.shape[:2]
    conv = (F.conv1d, F.conv2d, F.conv3d)[spatial - 1]
    out = x.reshape(1, batch * channels, *x.shape[2:])
    kernel = weights.repeat_interleave(channels, 0)  # (B*C, taps): one kernel per sample and channel
    for axis in range(spatial):
        shape = [batch * channels, 1] + [1] * spatial
        shape[2 + axis] = kernel.shape[1]
        padding = [0] * spatial
        padding[axis] = radius
        out = conv(out, kernel.reshape(shape), padding=tuple(padding), groups=batch * channels)
    return out.reshape(x.shape)


def intensity_perturbation(x: torch.Tensor, generator: torch.Generator | None = None, gamma: float = 0.7,
                           contrast: tuple[float, float] = (0.65, 1.5), brightness: float = 0.3,
                           noise: float = 0.15, blur: tuple[float, float] = (0.0, 1.5)) -> torch.Tensor:
    """``x`` (B, C, *spatial, z-scored as nnU-Net normalises) with a new appearance per sample:

    - a gamma curve exp(U(-gamma, gamma)) on the sample's own [min, max] range;
    - contrast around the sample's mean, x U(*contrast); a brightness shift of N(0, brightness) sd;
    - Gaussian noise of U(0, noise) sd; Gaussian blur of sigma U(*blur) voxels.
    """
    n = x.shape[0]
    device = x.device
    dims = tuple(range(1, x.ndim))
    view = (n,) + (1,) * (x.ndim - 1)
    lo, hi = x.amin(dim=dims, keepdim=True), x.amax(dim=dims, keepdim=True)
    span = (hi - lo).clamp_min(1e-6)
    g = torch.exp(uniform_draws(-gamma, gamma, n, generator, device)).reshape(view).to(x.dtype)
    out = lo + span * ((x - lo) / span).clamp(0, 1) ** g
    mean, sd = out.mean(dim=dims, keepdim=True), out.std(dim=dims, keepdim=True).clamp_min(1e-6)
    out = mean + (out - mean) * uniform_draws(*contrast, n, generator, device).reshape(view).to(x.dtype)
    shift = torch.randn(n, generator=generator, device=generator.device if generator is not None else device)
    out = out + (brightness * shift.to(device)).reshape(view).to(x.dtype) * sd
    out = gaussian_blur(out, uniform_draws(*blur, n, generator, device))
    noise_sd = uniform_draws(0.0, noise, n, generator, device).reshape(view).to(x.dtype) * sd
    draw_device = generator.device if generator is not None else device
    return out + noise_sd * torch.randn(x.shape, generator=generator, device=draw_device).to(device, x.dtype)


def bias_field(x: torch.Tensor, strength: torch.Tensor, generator: torch.Generator | None = None,
               grid: int = 4) -> torch.Tensor:
    """``x`` (B, C, *spatial) under a smooth multiplicative field: ``lo + (x - lo) exp(s f)`` per sample, with ``lo``
    the sample's minimum, ``f`` a zero-mean, unit-sd field interpolated from ``grid`` random values per axis, and
    ``s`` = ``strength`` (one per sample, 0 leaves the sample as it is); each sample keeps its mean and sd.

    Why: an MRI coil's bias field can darken an organ to the image's background level while it stays brighter than
    its surroundings (the domain-shift benchmark's missed cases; docs/benchmarks.md). Restoring the mean and sd
    does what per-scan z-scoring does after a scanner's field, so the patch stays in nnU-Net's intensity range.
    """
    spatial = x.ndim - 2
    if grid < 2:
        raise ValueError(f"bias_field needs a grid of at least 2 values per axis, got {grid}")
    draw_device = generator.device if generator is not None else x.device
    coarse = torch.randn((x.shape[0], 1) + (grid,) * spatial, generator=generator, device=draw_device).to(x.device)
    mode = ("linear", "bilinear", "trilinear")[spatial - 1]
    field = F.interpolate(coarse, size=x.shape[2:], mode=mode, align_corners=True)
    dims = tuple(range(1, x.ndim))
    field = (field - field.mean(dim=dims, keepdim=True)) / field.std(dim=dims, keepdim=True).clamp_min(1e-6)
    view = (-1,) + (1,) * (x.ndim - 1)
    xf = x.to(torch.promote_types(x.dtype, torch.float32))  # half precision would round the field away
    field = field.to(xf.dtype)
    lo = xf.amin(dim=dims, keepdim=True)
    out = lo + (xf - lo) * torch.exp(strength.to(xf).reshape(view) * field)
    mean, sd = xf.mean(dim=dims, keepdim=True), xf.std(dim=dims, keepdim=True)
    out = (out - out.mean(dim=dims, keepdim=True)) / out.std(dim=dims, keepdim=True).clamp_min(1e-6) * sd + mean
    return torch.where(strength.reshape(view) > 0, out, xf).to(x.dtype)


def amplitude_mix(x: torch.Tensor, style: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x`` (B, C, *spatial) rendered with the appearance of ``style`` (same shape): the Fourier amplitude of each
    sample becomes ``(1 - w) |F(x)| + w |F(style)|`` (w = ``weight``, one per sample) while its phase stays.

    The phase carries where the edges are, so x's labels stay valid voxel for voxel; the amplitude carries the
    intensity level, contrast, smooth bias and the balance of fine and coarse detail (blur, noise): with ``style``
    an unlabeled scan of another scanner, a labeled patch looks more like that scanner (Fourier domain adaptation,
    Yang & Soatto 2020; amplitude mixing, Xu et al. 2021). Computed in float32 over the spatial axes.
    """
    if x.shape != style.shape:
        raise ValueError(f"amplitude_mix needs x and style of one shape, got {tuple(x.shape)} and {tuple(style.shape)}")
    dims = tuple(range(2, x.ndim))
    spectrum = torch.fft.rfftn(x.float(), dim=dims)
    amplitude = torch.lerp(spectrum.abs(), torch.fft.rfftn(style.float(), dim=dims).abs(),
                           weight.float().reshape((-1,) + (1,) * (x.ndim - 1)))
    mixed = torch.polar(amplitude, spectrum.angle())
    return torch.fft.irfftn(mixed, s=x.shape[2:], dim=dims).to(x.dtype)


def spectrum_clutter(x: torch.Tensor, style: torch.Tensor, weight: torch.Tensor,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """``x`` (B, C, *spatial) plus a random field with the Fourier amplitude of ``style`` (same shape) and a random
    phase, ``(x + w field) / sqrt(1 + w^2)`` with w = ``weight`` (one per sample); the field's mean is 0.

    Why: ``amplitude_mix`` keeps x's phase, so all of the style's low-frequency power lands on x's own
    structures and its organ keeps its contrast in z-scores; a scanner with a strong bias field and noise
    spreads that power over the whole image instead, which lowers every tissue's contrast. The random-phase
    field is that power with no structure of its own (nothing to label), and the division keeps the patch's
    power where it was, so a labeled patch drawn to ``style``'s power keeps it.
    """
    if x.shape != style.shape:
        raise ValueError(f"spectrum_clutter needs x and style of one shape, got {tuple(x.shape)} and "
                         f"{tuple(style.shape)}")
    dims = tuple(range(2, x.ndim))
    amplitude = torch.fft.rfftn(style.float(), dim=dims).abs()
    amplitude[(slice(None), slice(None)) + (0,) * len(dims)] = 0.0  # the field adds no constant offset
    draw_device = generator.device if generator is not None else x.device
    white = torch.randn(x.shape, generator=generator, device=draw_device).to(x.device)
    field = torch.fft.irfftn(torch.polar(amplitude, torch.fft.rfftn(white, dim=dims).angle()), s=x.shape[2:],
                             dim=dims)
    w = weight.float().reshape((-1,) + (1,) * (x.ndim - 1))
    return ((x.float() + w * field) / torch.sqrt(1 + w ** 2)).to(x.dtype)


def histogram_match(x: torch.Tensor, reference: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x`` (B, C, *spatial) moved towards the intensity distribution of ``reference`` (same shape): each voxel
    of a sample and channel takes the value of the same rank in ``reference``, mixed as ``(1 - w) x + w matched``.

    The mapping is monotonic, so what is brighter stays brighter and x's labels stay valid; what changes is the
    intensity scale and contrast between tissues, which per-scan z-scoring leaves different from scanner to
    scanner (a bias field widens the background's spread and shrinks the organ's contrast in z-scores).
    """
    if x.shape != reference.shape:
        raise ValueError(f"histogram_match needs x and reference of one shape, got {tuple(x.shape)} and "
                         f"{tuple(reference.shape)}")
    flat = x.reshape(*x.shape[:2], -1)
    ranks = flat.argsort(dim=-1)
    matched = torch.empty_like(flat)
    matched.scatter_(-1, ranks, reference.reshape(*x.shape[:2], -1).sort(dim=-1).values.to(x.dtype))
    return torch.lerp(x, matched.reshape(x.shape), weight.to(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1)))


def restyle(x: torch.Tensor, style: torch.Tensor, appearance: str, weight: torch.Tensor,
            generator: torch.Generator | None = None) -> torch.Tensor:
    """``x`` in ``style``'s appearance by the parts ``appearance`` names ("fourier", "histogram", "clutter", in
    that order, e.g. ``"fourier_clutter"``), each with the per-sample ``weight``; "labeled" leaves x as it is.
    The one place the trainers' ``pasted_appearance`` / ``labeled_appearance`` and the probes turn a name into
    transforms."""
    if "fourier" in appearance:
        x = amplitude_mix(x, style, weight)
    if "histogram" in appearance:
        x = histogram_match(x, style, weight)
    if "clutter" in appearance:
        x = spectrum_clutter(x, style, weight, generator)
    return x
