"""HF-Mamba: the FFT high-pass and the attention module, in 2D and 3D."""

from __future__ import annotations

import pytest
import torch

from nnunetv2_diffcl.network_architectures.hf_mamba import HFMamba, high_pass, low_frequency_box

SHAPES = [(6, 6), (7, 5), (1, 9), (4, 6, 8), (5, 3, 7), (2, 2, 2)]


def checkerboard(shape: tuple) -> torch.Tensor:
    """(+1, -1) alternating along every axis: all energy at the Nyquist frequency."""
    grids = torch.meshgrid(*(torch.arange(n) for n in shape), indexing="ij")
    return (-1.0) ** sum(grids).float()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("cutoff", [0.1, 0.25, 0.5, 0.9])
def test_high_pass_removes_constant(shape: tuple, cutoff: float) -> None:
    x = torch.full((2, 3, *shape), 4.2)
    torch.testing.assert_close(high_pass(x, cutoff), torch.zeros_like(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("shape", [(6, 6), (8, 4), (4, 6, 8), (2, 2, 2), (10, 10, 10)])
@pytest.mark.parametrize("cutoff", [0.1, 0.25, 0.5, 0.9])
def test_high_pass_keeps_checkerboard(shape: tuple, cutoff: float) -> None:
    x = checkerboard(shape).expand(2, 3, *shape)
    torch.testing.assert_close(high_pass(x, cutoff), x, rtol=0, atol=1e-5)
    # a checkerboard on top of a constant: only the constant goes
    torch.testing.assert_close(high_pass(x + 3.0, cutoff), x, rtol=0, atol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
def test_high_pass_real_zero_mean_and_idempotent(shape: tuple) -> None:
    x = torch.randn(2, 3, *shape, dtype=torch.float64)
    y = high_pass(x, 0.25)
    assert y.shape == x.shape and y.dtype == torch.float32
    dims = tuple(range(2, x.dim()))
    torch.testing.assert_close(y.mean(dim=dims), torch.zeros(2, 3), rtol=0, atol=1e-5)
    torch.testing.assert_close(high_pass(y, 0.25), y, rtol=0, atol=1e-5)
    # what was removed is the smooth part: the box filter applied to the spectrum, and nothing more
    spectrum = torch.fft.fftshift(torch.fft.fftn(y.double(), dim=dims), dim=dims)
    box = low_frequency_box(shape, 0.25)
    assert spectrum[..., box].abs().max() < 1e-4
    # the symmetric box keeps real inputs real: no imaginary part is thrown away
    full = torch.fft.ifftn(torch.fft.ifftshift(spectrum, dim=dims), dim=dims)
    assert full.imag.abs().max() < 1e-5


def _high_pass_by_spectrum(x: torch.Tensor, cutoff: float) -> torch.Tensor:
    """The definition: zero the centred low-frequency box of the spectrum, transform back."""
    dims = tuple(range(2, x.dim()))
    spectrum = torch.fft.fftshift(torch.fft.fftn(x, dim=dims), dim=dims)
    spectrum = spectrum.masked_fill(low_frequency_box(x.shape[2:], cutoff), 0)
    return torch.fft.ifftn(torch.fft.ifftshift(spectrum, dim=dims), dim=dims).real


@pytest.mark.parametrize("shape,cutoff,dc_only", [((4, 4), 0.25, True), ((4, 6, 6), 0.25, True), ((7, 7), 0.25, True),
                                                  ((8, 8), 0.25, False), ((4, 4), 0.5, False), ((5, 3, 7), 0.9, False)])
def test_high_pass_matches_the_spectral_definition(shape: tuple, cutoff: float, dc_only: bool) -> None:
    # where the box is the DC bin alone high_pass subtracts the mean instead of transforming; value and gradient
    # must be those of the transform either way
    assert (low_frequency_box(shape, cutoff).sum() == 1) == dc_only
    x = torch.randn(2, 3, *shape, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(2, 3, *shape, dtype=torch.float64)
    got = high_pass(x, cutoff)
    (grad,) = torch.autograd.grad((got * weights).sum(), x)
    want = _high_pass_by_spectrum(x, cutoff)
    (want_grad,) = torch.autograd.grad((want * weights).sum(), x)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5)
    torch.testing.assert_close(grad, want_grad, rtol=0, atol=1e-5)


def test_low_frequency_box_size() -> None:
    box = low_frequency_box((16, 9, 1), 0.25)
    assert box.shape == (16, 9, 1)
    # |f| <= floor(0.25 * n / 2): 5 bins of 16, 3 of 9, the single bin of 1
    assert box.sum() == 5 * 3 * 1
    assert box[8, 4, 0]  # DC after fftshift
    assert not box[0, 0, 0]  # Nyquist corner


@pytest.mark.parametrize("cutoff", [0.0, 1.0, -0.1, 1.5])
def test_bad_cutoff(cutoff: float) -> None:
    with pytest.raises(ValueError, match="cutoff_ratio"):
        high_pass(torch.zeros(1, 1, 4, 4), cutoff)
    with pytest.raises(ValueError, match="cutoff_ratio"):
        HFMamba(4, cutoff_ratio=cutoff)


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("spatial", [(6, 6), (7, 5), (3, 5, 4), (4, 4, 4)])
def test_module_shape_dtype_and_backward(batch: int, spatial: tuple) -> None:
    torch.manual_seed(0)
    module = HFMamba(8, cutoff_ratio=0.25, d_state=4)
    x = torch.randn(batch, 8, *spatial, requires_grad=True)
    y = module(x)
    assert y.shape == x.shape and y.dtype == x.dtype and torch.isfinite(y).all()
    y.square().mean().backward()
    assert torch.isfinite(x.grad).all()
    assert all(p.grad is not None for p in module.parameters())


def test_fusion_is_x_plus_x_times_attention() -> None:
    torch.manual_seed(0)
    module = HFMamba(6)
    x = torch.randn(2, 6, 5, 4, 3)
    att = module.attention(x)
    assert att.shape == x.shape and ((att > 0) & (att < 1)).all()
    torch.testing.assert_close(module(x), x + x * att)
    # the fusion is multiplicative in x: a zero feature map stays zero
    zeros = torch.zeros(1, 6, 4, 4)
    torch.testing.assert_close(module(zeros), zeros)


def test_attention_depends_only_on_high_frequencies() -> None:
    torch.manual_seed(0)
    module = HFMamba(4)
    x = torch.randn(1, 4, 6, 6, 6)
    shifted = x + torch.randn(1, 4, 1, 1, 1)  # add a per-channel constant (pure DC)
    torch.testing.assert_close(module.attention(shifted), module.attention(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("spatial", [(5, 6), (3, 4, 5)])
def test_float32_inside_autocast_bfloat16(spatial: tuple) -> None:
    torch.manual_seed(0)
    module = HFMamba(8)
    seen = []
    module.proj.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    x = torch.randn(2, 8, *spatial)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = module(x.bfloat16())
    assert y.dtype == torch.bfloat16 and seen == [torch.float32]
    torch.testing.assert_close(y.float(), module(x.bfloat16().float()), rtol=2e-2, atol=2e-2)


def test_rejects_wrong_channels() -> None:
    with pytest.raises(ValueError, match="expected"):
        HFMamba(8)(torch.randn(1, 4, 5, 5))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu_and_autocast() -> None:
    torch.manual_seed(0)
    module = HFMamba(16)
    x = torch.randn(2, 16, 6, 6, 6)
    with torch.no_grad():
        y_cpu = module(x)
        module = module.cuda()
        y_gpu = module(x.cuda())
        with torch.autocast("cuda", dtype=torch.float16):
            y_half = module(x.cuda().half())
    torch.testing.assert_close(y_gpu.cpu(), y_cpu, rtol=1e-3, atol=1e-3)
    assert y_half.dtype == torch.float16 and torch.isfinite(y_half).all()
