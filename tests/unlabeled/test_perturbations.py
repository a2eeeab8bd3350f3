"""Appearance perturbations: the student's strong intensity change, and the Fourier and histogram restyling of pasted
labeled patches (identity at zero strength, known values, per-sample draws)."""

from __future__ import annotations

import pytest
import torch

from nnunetv2_diffcl.unlabeled.perturbations import (
    amplitude_mix,
    bias_field,
    gaussian_blur,
    histogram_match,
    intensity_perturbation,
    spectrum_clutter,
)

OFF = {"gamma": 0.0, "contrast": (1.0, 1.0), "brightness": 0.0, "noise": 0.0, "blur": (0.0, 0.0)}


@pytest.mark.parametrize("shape", [(2, 1, 12, 10), (2, 2, 6, 8, 10)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_zero_strength_is_the_identity(shape, dtype):
    x = torch.randn(shape, dtype=dtype)
    out = intensity_perturbation(x, **OFF)
    assert out.shape == x.shape and out.dtype == dtype
    torch.testing.assert_close(out, x)


def test_contrast_scales_deviations_from_the_mean():
    x = torch.randn(1, 1, 16, 16)
    out = intensity_perturbation(x, **{**OFF, "contrast": (2.0, 2.0)})
    torch.testing.assert_close(out - out.mean(), 2 * (x - x.mean()))


def test_gamma_keeps_the_range_and_the_order():
    x = torch.linspace(-2, 3, 100).reshape(1, 1, 10, 10)
    out = intensity_perturbation(x, torch.Generator().manual_seed(0), **{**OFF, "gamma": 0.7})
    assert float(out.min()) == pytest.approx(-2) and float(out.max()) == pytest.approx(3)
    assert bool((out.flatten().diff() >= 0).all())  # a monotone curve: the anatomy's edges stay where they are
    assert not torch.allclose(out, x)


@pytest.mark.parametrize("spatial", [(21,), (21, 21), (21, 21, 21)])
def test_blur_of_a_delta_is_a_normalised_gaussian_of_that_sigma(spatial):
    x = torch.zeros(2, 1, *spatial)
    x[(slice(None), 0, *[10] * len(spatial))] = 1.0
    out = gaussian_blur(x, torch.tensor([1.5, 0.0]))
    assert float(out[0].sum()) == pytest.approx(1.0, abs=1e-5)
    # variance along the first axis of the blurred delta = sigma^2 (the truncated tails change it by < 1 %)
    profile = out[0, 0].reshape(21, -1).sum(1)
    positions = torch.arange(21.0) - 10
    assert float((profile * positions ** 2).sum()) == pytest.approx(1.5 ** 2, rel=0.01)
    torch.testing.assert_close(out[1], x[1])  # sigma 0: untouched


def test_each_sample_gets_its_own_appearance():
    x = torch.randn(1, 1, 16, 16).repeat(2, 1, 1, 1)
    out = intensity_perturbation(x, torch.Generator().manual_seed(3))
    assert not torch.allclose(out[0], out[1])
    again = intensity_perturbation(x, torch.Generator().manual_seed(3))
    torch.testing.assert_close(out, again)  # reproducible from the generator


@pytest.mark.parametrize("restyle", [amplitude_mix, spectrum_clutter])
@pytest.mark.parametrize("shape", [(3, 1, 12, 10), (2, 2, 6, 8, 10)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_restyle_at_zero_weight_is_the_identity(restyle, shape, dtype):
    x, style = torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)
    out = restyle(x, style, torch.zeros(shape[0]))
    assert out.shape == x.shape and out.dtype == dtype
    torch.testing.assert_close(out, x, atol=1e-5, rtol=0)


@pytest.mark.parametrize("shape", [(3, 1, 12, 10), (2, 2, 6, 8, 10)])
def test_amplitude_mix_takes_the_styles_amplitude_and_keeps_the_phase(shape):
    torch.manual_seed(0)
    x, style = torch.randn(shape), 3.0 * torch.randn(shape) + 1.0
    weight = torch.rand(shape[0])
    out = amplitude_mix(x, style, weight)
    dims = tuple(range(2, len(shape)))
    fx, fs, fo = (torch.fft.rfftn(a, dim=dims) for a in (x, style, out))
    view = (-1,) + (1,) * (len(shape) - 1)
    expected = (1 - weight.reshape(view)) * fx.abs() + weight.reshape(view) * fs.abs()
    # both amplitudes are even and x's phase is odd in frequency, so the mixed spectrum is a real signal's and the
    # inverse transform returns it unchanged
    torch.testing.assert_close(fo.abs(), expected, atol=1e-3, rtol=1e-3)
    strong = fx.abs() > 1e-3
    phase_difference = torch.angle(fo[strong] * fx[strong].conj())
    assert phase_difference.abs().max() < 1e-3


def test_amplitude_mix_of_a_constant_style_keeps_x_but_sets_its_mean():
    # a constant image's spectrum is its DC term alone: at weight 1 the mean becomes the style's and, with no
    # amplitude at other frequencies, everything else vanishes; at weight 1/2 the mean is the average of the two
    x = torch.randn(1, 1, 8, 8) + 2.0
    style = torch.full((1, 1, 8, 8), -1.0)
    half = amplitude_mix(x, style, torch.tensor([0.5]))
    # the DC amplitude mixes |mean| values, the sign (phase) stays x's: 0.5 |m_x| + 0.5 * 1
    assert float(half.mean()) == pytest.approx(0.5 * float(x.mean()) + 0.5, abs=1e-5)
    torch.testing.assert_close(half - half.mean(), 0.5 * (x - x.mean()), atol=1e-5, rtol=0)


def test_amplitude_mix_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match="one shape"):
        amplitude_mix(torch.zeros(2, 1, 8, 8), torch.zeros(2, 1, 8, 9), torch.zeros(2))


@pytest.mark.parametrize("shape", [(3, 1, 12, 10), (2, 2, 6, 8, 10)])
def test_spectrum_clutter_field_has_the_styles_amplitude_and_no_mean(shape):
    # x = 0 and w = 1: the output is the field / sqrt(2), so its amplitude is the style's / sqrt(2) at every
    # frequency but the constant one (0: the field has mean 0)
    torch.manual_seed(0)
    style = 3.0 * torch.randn(shape) + 1.0
    out = spectrum_clutter(torch.zeros(shape), style, torch.ones(shape[0]), torch.Generator().manual_seed(1))
    dims = tuple(range(2, len(shape)))
    expected = torch.fft.rfftn(style, dim=dims).abs() / 2 ** 0.5
    expected.reshape(*shape[:2], -1)[..., 0] = 0.0
    # random phases need not be a real signal's where a frequency is its own mirror (the Nyquist and constant
    # lines); irfftn keeps the real part there, so compare the other frequencies
    spectrum = torch.fft.rfftn(out, dim=dims).abs()
    inner = (slice(None), slice(None), *[slice(1, (n + 1) // 2) for n in shape[2:-1]], slice(1, (shape[-1] + 1) // 2))
    torch.testing.assert_close(spectrum[inner], expected[inner], atol=1e-3, rtol=1e-3)
    assert float(out.mean()) == pytest.approx(0.0, abs=1e-5)
    # its phase is random: a second generator gives another field of the same amplitude
    other = spectrum_clutter(torch.zeros(shape), style, torch.ones(shape[0]), torch.Generator().manual_seed(2))
    assert not torch.allclose(out, other)


def test_spectrum_clutter_keeps_the_patch_power_at_equal_power_known_values():
    # x and the field carry equal power here (x's own amplitude is the style): (x + w f) / sqrt(1 + w^2) has the
    # power of x for any w, since x and a random-phase field are (nearly) uncorrelated; and x's mean is scaled by
    # 1 / sqrt(1 + w^2), the field adds none
    torch.manual_seed(0)
    x = torch.randn(4, 1, 64, 64) + 2.0
    out = spectrum_clutter(x, x, torch.full((4,), 0.75), torch.Generator().manual_seed(1))  # not x's own draws
    torch.testing.assert_close(out.mean(dim=(1, 2, 3)), x.mean(dim=(1, 2, 3)) / 1.25, atol=1e-4, rtol=0)
    assert float(out.var(dim=(1, 2, 3)).mean()) == pytest.approx(float(x.var(dim=(1, 2, 3)).mean()), rel=0.1)


def test_spectrum_clutter_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match="one shape"):
        spectrum_clutter(torch.zeros(2, 1, 8, 8), torch.zeros(2, 1, 8, 9), torch.zeros(2))


def test_histogram_match_maps_rank_to_rank_known_values():
    x = torch.tensor([[[3.0, 1.0, 2.0, 10.0]]])
    reference = torch.tensor([[[-5.0, 0.5, 7.0, 0.0]]])
    # sorted reference: -5, 0, 0.5, 7; x's ranks: 3 -> 3rd, 1 -> 1st, 2 -> 2nd, 10 -> 4th
    torch.testing.assert_close(histogram_match(x, reference, torch.ones(1)), torch.tensor([[[0.5, -5.0, 0.0, 7.0]]]))
    torch.testing.assert_close(histogram_match(x, reference, torch.tensor([0.5])),
                               torch.tensor([[[1.75, -2.0, 1.0, 8.5]]]))


@pytest.mark.parametrize("shape", [(3, 1, 12, 10), (2, 2, 6, 8, 10)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_histogram_match_takes_the_references_values_and_keeps_the_order(shape, dtype):
    torch.manual_seed(0)
    x, reference = torch.randn(shape, dtype=dtype), torch.rand(shape, dtype=dtype) ** 3
    out = histogram_match(x, reference, torch.ones(shape[0]))
    assert out.shape == x.shape and out.dtype == dtype
    flat_out, flat_x = out.reshape(*shape[:2], -1), x.reshape(*shape[:2], -1)
    torch.testing.assert_close(flat_out.sort(-1).values, reference.reshape(*shape[:2], -1).sort(-1).values)
    assert torch.equal(flat_out.argsort(-1), flat_x.argsort(-1))  # monotonic: brighter stays brighter
    torch.testing.assert_close(histogram_match(x, reference, torch.zeros(shape[0])), x)


def test_histogram_match_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match="one shape"):
        histogram_match(torch.zeros(2, 1, 8, 8), torch.zeros(1, 1, 8, 8), torch.zeros(2))


@pytest.mark.parametrize("shape", [(3, 1, 12, 10), (2, 2, 6, 8, 10)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bias_field_keeps_each_samples_mean_and_sd_and_zero_strength_is_the_identity(shape, dtype):
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=dtype)
    strength = torch.zeros(shape[0])
    strength[1:] = 1.0
    out = bias_field(x, strength)
    assert out.shape == x.shape and out.dtype == dtype
    assert torch.equal(out[0], x[0])
    dims = tuple(range(1, x.ndim))
    torch.testing.assert_close(out.mean(dim=dims), x.mean(dim=dims), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.std(dim=dims), x.std(dim=dims), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out[1:], x[1:], atol=1e-2)


def test_bias_field_is_a_positive_factor_on_the_intensity_above_the_minimum():
    # a dark half at the minimum and a bright half: the field scales only what lies above the minimum, so the dark
    # half stays one value, below every bright voxel, however the field varies over the patch
    torch.manual_seed(0)
    x = torch.zeros(4, 1, 16, 16)
    x[..., 8:] = 1.0
    out = bias_field(x, torch.full((4,), 2.0))
    dark, bright = out[..., :8], out[..., 8:]
    assert torch.allclose(dark, dark[..., :1, :1].expand_as(dark))
    assert (bright.flatten(1).amin(1) > dark.flatten(1).amax(1)).all()
    assert (bright.flatten(1).std(1) > 0.05).all()  # the bright half is no longer flat: the field is there


def test_bias_field_refuses_a_grid_that_cannot_vary():
    with pytest.raises(ValueError, match="grid of at least 2"):
        bias_field(torch.zeros(1, 1, 4, 4), torch.ones(1), grid=1)
