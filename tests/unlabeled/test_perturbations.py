"""The student's strong appearance perturbation: identity at zero strength, known values, per-sample draws."""

from __future__ import annotations

import pytest
import torch

from nnunetv2_diffcl.unlabeled.perturbations import gaussian_blur, intensity_perturbation

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
