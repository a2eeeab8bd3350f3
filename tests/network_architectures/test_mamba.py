"""The own Mamba layer: shapes, init, float32 under autocast, and parity with mamba-ssm's ``Mamba``.

The parity tests run mamba-ssm's own module on the CPU. mamba-ssm imports its CUDA extension
``selective_scan_cuda`` unconditionally, so (in this test only) a placeholder module is registered
under that name before the import, and mamba-ssm's slow path is pointed at its pure-PyTorch reference
scan. Install for CPU: ``MAMBA_FORCE_BUILD=TRUE MAMBA_SKIP_CUDA_BUILD=TRUE pip install
--no-build-isolation mamba-ssm`` (no causal-conv1d).
"""

from __future__ import annotations

import importlib.util
import math
import sys
import types
from collections.abc import Iterator

import pytest
import torch

from nnunetv2_diffcl.network_architectures import selective_scan as ss
from nnunetv2_diffcl.network_architectures.mamba import Mamba

CONFIGS = [
    dict(d_model=16),
    dict(d_model=24, d_state=8, expand=1),
    dict(d_model=40, d_state=4, d_conv=3, dt_rank=5, bias=True, conv_bias=False),
    dict(d_model=32, dt_init="constant", dt_min=0.01, dt_max=0.05),
]


@pytest.fixture(scope="module")
def mamba_simple() -> Iterator[types.ModuleType]:
    """mamba-ssm's ``mamba_simple`` module, importable on a CPU-only machine, its scan = reference."""
    added = []
    if "selective_scan_cuda" not in sys.modules and importlib.util.find_spec("selective_scan_cuda") is None:
        sys.modules["selective_scan_cuda"] = types.ModuleType("selective_scan_cuda")
        added.append("selective_scan_cuda")
    had = {name for name in sys.modules if name.split(".")[0] == "mamba_ssm"}
    try:
        module = pytest.importorskip(
            "mamba_ssm.modules.mamba_simple",
            reason="mamba-ssm not installed (CPU install: MAMBA_FORCE_BUILD=TRUE MAMBA_SKIP_CUDA_BUILD=TRUE "
                   "pip install --no-build-isolation mamba-ssm)",
        )
        from mamba_ssm.ops.selective_scan_interface import selective_scan_ref

        with pytest.MonkeyPatch.context() as mp:
            # slow path (no causal_conv1d kernel), reference scan instead of the CUDA kernel
            mp.setattr(module, "causal_conv1d_fn", None)
            mp.setattr(module, "selective_scan_fn", selective_scan_ref)
            yield module
    finally:
        # Leave no trace: other tests must see mamba-ssm as production code sees it.
        for name in [n for n in sys.modules if n.split(".")[0] == "mamba_ssm" and n not in had]:
            del sys.modules[name]
        for name in added:
            del sys.modules[name]
        ss.mamba_ssm_scan_fn.cache_clear()


def seeded(cls: type, seed: int, **kwargs: object) -> torch.nn.Module:
    torch.manual_seed(seed)
    return cls(**kwargs)


# ---------------------------------------------------------------- own module


@pytest.mark.parametrize("batch, length", [(1, 1), (1, 7), (2, 50), (3, 129)])
@pytest.mark.parametrize("config", CONFIGS[:3], ids=["default", "small", "bias"])
def test_forward_shape_and_backward(batch: int, length: int, config: dict) -> None:
    layer = seeded(Mamba, 0, **config)
    x = torch.randn(batch, length, config["d_model"], requires_grad=True)
    y = layer(x)
    assert y.shape == x.shape and y.dtype == x.dtype and torch.isfinite(y).all()
    y.square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in layer.parameters())


def test_causal() -> None:
    """Token t depends only on tokens <= t: changing the future leaves the past unchanged."""
    layer = seeded(Mamba, 0, d_model=16)
    x = torch.randn(2, 30, 16)
    x2 = x.clone()
    x2[:, 20:] += 1.0
    y, y2 = layer(x), layer(x2)
    torch.testing.assert_close(y[:, :20], y2[:, :20])
    assert not torch.allclose(y[:, 20:], y2[:, 20:])


@pytest.mark.parametrize("config", CONFIGS, ids=["default", "small", "bias", "constant"])
def test_initialisation(config: dict) -> None:
    layer = seeded(Mamba, 1, **config)
    d_inner = int(config.get("expand", 2) * config["d_model"])
    d_state = config.get("d_state", 16)
    dt_rank = config.get("dt_rank", math.ceil(config["d_model"] / 16))
    assert (layer.d_inner, layer.dt_rank) == (d_inner, dt_rank)
    a_log = torch.log(torch.arange(1, d_state + 1.0)).expand(d_inner, d_state)
    torch.testing.assert_close(layer.A_log, a_log)
    torch.testing.assert_close(layer.D, torch.ones(d_inner))
    dt = torch.nn.functional.softplus(layer.dt_proj.bias.detach())
    dt_min, dt_max = config.get("dt_min", 1e-3), config.get("dt_max", 0.1)
    assert dt.min() >= dt_min * (1 - 1e-4) and dt.max() <= dt_max * (1 + 1e-4)
    # log-uniform: about half of the step sizes below the geometric mean of the range
    below = (dt < math.sqrt(dt_min * dt_max)).float().mean()
    assert 0.2 < below < 0.8
    std = dt_rank**-0.5
    w = layer.dt_proj.weight.detach()
    if config.get("dt_init") == "constant":
        torch.testing.assert_close(w, torch.full_like(w, std))
    else:
        assert w.abs().max() <= std and w.std() > 0.3 * std
    assert layer.dt_proj.bias._no_reinit and layer.A_log._no_weight_decay and layer.D._no_weight_decay
    assert all(p.dtype == torch.float32 for p in layer.parameters())


def test_float32_inside_autocast() -> None:
    layer = seeded(Mamba, 0, d_model=16)
    seen = []
    layer.in_proj.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    layer.out_proj.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    x = torch.randn(2, 20, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x.bfloat16())
        y32 = layer(x)
    assert seen == [torch.float32] * 4
    assert y.dtype == torch.bfloat16 and y32.dtype == torch.float32
    expected = layer(x.bfloat16().float())  # only the input was rounded
    torch.testing.assert_close(y.float(), expected, rtol=1e-2, atol=1e-2)


def test_rejects_wrong_shape() -> None:
    with pytest.raises(ValueError, match="expected"):
        Mamba(16)(torch.randn(2, 16, 10))


# ---------------------------------------------------------------- parity with mamba-ssm


@pytest.mark.parametrize("config", CONFIGS, ids=["default", "small", "bias", "constant"])
def test_parameter_names_shapes_and_init_match_mamba_ssm(mamba_simple: types.ModuleType,
                                                         config: dict) -> None:
    theirs = seeded(mamba_simple.Mamba, 3, **config)
    ours = seeded(Mamba, 3, **config)
    s_theirs, s_ours = theirs.state_dict(), ours.state_dict()
    assert list(s_ours) == list(s_theirs)
    assert {k: v.shape for k, v in s_ours.items()} == {k: v.shape for k, v in s_theirs.items()}
    # Same seed, same random draws in the same order: identical initial weights.
    for key in s_theirs:
        torch.testing.assert_close(s_ours[key], s_theirs[key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("config", CONFIGS, ids=["default", "small", "bias", "constant"])
@pytest.mark.parametrize("batch, length", [(1, 1), (2, 33)])
def test_outputs_and_gradients_match_mamba_ssm(mamba_simple: types.ModuleType, config: dict, batch: int,
                                               length: int) -> None:
    theirs = seeded(mamba_simple.Mamba, 4, **config)
    ours = seeded(Mamba, 5, **config)  # different init on purpose: the weights come from load_state_dict
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(batch, length, config["d_model"])
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y_theirs, y_ours = theirs(x1), ours(x2)
    torch.testing.assert_close(y_ours, y_theirs, rtol=1e-5, atol=1e-5)
    y_theirs.square().sum().backward()
    y_ours.square().sum().backward()
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-4, atol=1e-5)
    grads_theirs = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, grads_theirs[name].grad, rtol=1e-4, atol=1e-5, msg=name)


def test_their_module_loads_our_state_dict(mamba_simple: types.ModuleType) -> None:
    ours = seeded(Mamba, 6, d_model=24)
    theirs = seeded(mamba_simple.Mamba, 7, d_model=24)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 17, 24)
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), ours(x), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- GPU


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu() -> None:
    layer = seeded(Mamba, 0, d_model=32)
    x = torch.randn(2, 300, 32)
    with torch.no_grad():
        y_cpu = layer(x)
        y_gpu = layer.cuda()(x.cuda())
    torch.testing.assert_close(y_gpu.cpu(), y_cpu, rtol=1e-3, atol=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_real_mamba_ssm() -> None:
    """On a GPU with mamba-ssm installed: its fused fast path against ours (its kernel or the own scan)."""
    ss.mamba_ssm_scan_fn.cache_clear()
    if ss.mamba_ssm_scan_fn()[0] is None:
        pytest.skip(f"mamba_ssm not importable: {ss.mamba_ssm_scan_fn()[1]}")
    import mamba_ssm

    theirs = seeded(mamba_ssm.Mamba, 0, d_model=64).cuda()
    ours = seeded(Mamba, 1, d_model=64).cuda()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 500, 64, device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-3, atol=1e-3)
