"""Selective scan backends: the chunked PyTorch scan and the sequential scan with its own backward against the
step-by-step recurrence, the choice between them by length, and the backend choice through ``nnUNet_diffcl_scan``."""

from __future__ import annotations

import inspect
import random

import pytest
import torch

from nnunetv2_diffcl.network_architectures import selective_scan as ss

LENGTHS = [1, 2, 7, 64, 1000, 4096]
OPTION_SETS = {
    "plain": dict(D=False, z=False, delta_bias=False, delta_softplus=False),
    "mamba": dict(D=True, z=True, delta_bias=True, delta_softplus=True),
    "D_only": dict(D=True, z=False, delta_bias=False, delta_softplus=False),
    "z_softplus": dict(D=False, z=True, delta_bias=False, delta_softplus=True),
    "bias_only": dict(D=False, z=False, delta_bias=True, delta_softplus=False),
}


def make_inputs(batch: int, d: int, n: int, length: int, seed: int = 0, log_a_scale: float = 1.0,
                log_a_shift: float = 0.0, delta_scale: float = 1.0, dtype: torch.dtype = torch.float32,
                device: str = "cpu") -> dict[str, torch.Tensor]:
    """Random scan inputs; delta >= 0 and A < 0 as in Mamba (decays in (0, 1])."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    tensors = {
        "u": rnd(batch, d, length),
        "delta": rnd(batch, d, length).abs() * delta_scale,
        "A": -torch.exp(rnd(d, n) * log_a_scale + log_a_shift),
        "B": rnd(batch, n, length),
        "C": rnd(batch, n, length),
        "D": rnd(d),
        "z": rnd(batch, d, length),
        "delta_bias": rnd(d) * 0.1,
    }
    return {k: v.to(device=device, dtype=dtype if k in ("u", "delta", "B", "C", "z") else torch.float32)
            .requires_grad_(True) for k, v in tensors.items()}


def call(fn, t: dict[str, torch.Tensor], opts: dict[str, bool], **kw):  # noqa: ANN001, ANN201 - test helper
    return fn(
        t["u"], t["delta"], t["A"], t["B"], t["C"],
        D=t["D"] if opts["D"] else None,
        z=t["z"] if opts["z"] else None,
        delta_bias=t["delta_bias"] if opts["delta_bias"] else None,
        delta_softplus=opts["delta_softplus"],
        **kw,
    )


def grads(out: torch.Tensor, t: dict[str, torch.Tensor], seed: int = 1) -> dict[str, torch.Tensor | None]:
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out)
    res = torch.autograd.grad((out * weight).sum(), list(t.values()), allow_unused=True)
    return dict(zip(t.keys(), res))


def assert_grads_close(g1: dict, g2: dict, rtol: float = 1e-4, atol: float = 1e-4) -> None:
    for key in g1:
        if g1[key] is None or g2[key] is None:
            assert g1[key] is None and g2[key] is None, key
            continue
        scale = g2[key].abs().max().clamp(min=1.0)
        try:
            torch.testing.assert_close(g1[key] / scale, g2[key] / scale, rtol=rtol, atol=atol)
        except AssertionError as exc:
            raise AssertionError(f"gradient of {key}: {exc}") from None


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("opt_name", list(OPTION_SETS))
def test_chunked_matches_loop_forward_and_gradients(length: int, opt_name: str) -> None:
    opts = OPTION_SETS[opt_name]
    t = make_inputs(2, 3, 4, length, seed=length)
    ref = call(ss.selective_scan_loop, t, opts)
    ref_grads = grads(ref, t)
    rng = random.Random(length * 31 + len(opt_name))
    # default, random lengths (boundaries anywhere, last chunk padded); for short sequences also the
    # extremes: one-step chunks, one chunk for all, a chunk longer than the sequence
    chunk_lens = {None, rng.randint(2, 128), rng.randint(100, 700)}
    if length <= 256:
        chunk_lens |= {1, rng.randint(1, length), length, length + 5}
    for chunk_len in chunk_lens:
        out = call(ss.selective_scan_torch, t, opts, chunk_len=chunk_len)
        assert out.shape == ref.shape and out.dtype == ref.dtype
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
        assert_grads_close(grads(out, t), ref_grads)



@pytest.mark.parametrize("length", [0, 1, 2, 7, 16, 64, 300])
@pytest.mark.parametrize("opt_name", list(OPTION_SETS))
def test_sequential_matches_loop_forward_and_gradients(length: int, opt_name: str) -> None:
    """The hand-written backward against autograd through the reference recurrence, every input."""
    opts = OPTION_SETS[opt_name]
    t = make_inputs(2, 3, 4, length, seed=length + 11)
    ref = call(ss.selective_scan_loop, t, opts)
    out = call(ss.selective_scan_sequential, t, opts)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    if length:
        assert_grads_close(grads(out, t), grads(ref, t))


@pytest.mark.parametrize("length", [1, 5, 40])
def test_sequential_last_state_and_its_gradient(length: int) -> None:
    """The last state is an output of its own: its gradient enters the backward at the last step."""
    t = make_inputs(2, 3, 4, length, seed=9)
    opts = OPTION_SETS["mamba"]
    out_ref, last_ref = call(ss.selective_scan_loop, t, opts, return_last_state=True)
    out, last = call(ss.selective_scan_sequential, t, opts, return_last_state=True)
    torch.testing.assert_close(out, out_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(last, last_ref, rtol=1e-4, atol=1e-4)
    # a loss on the last state alone: every gradient comes from grad_last (C, D and z get none: the reference
    # leaves them unused, the sequential scan's backward gives C a zero one)
    def zero_if_unused(g: dict) -> dict:
        return {k: torch.zeros_like(t[k]) if v is None else v for k, v in g.items()}
    g, g_ref = zero_if_unused(grads(last, t)), zero_if_unused(grads(last_ref, t))
    assert_grads_close(g, g_ref)
    assert g["u"].abs().sum() > 0 and g["C"].abs().sum() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_sequential_output_dtype_follows_u(dtype: torch.dtype) -> None:
    t = make_inputs(1, 3, 2, 20, dtype=dtype)
    out = call(ss.selective_scan_sequential, t, OPTION_SETS["mamba"])
    ref = call(ss.selective_scan_loop, t, OPTION_SETS["mamba"])
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref.float(), rtol=1e-2, atol=1e-2)


def test_sequential_strong_and_weak_decay_stay_finite() -> None:
    """No division by a decay: exp underflowing to 0 (strong) or staying near 1 (weak) is harmless."""
    for seed, log_a_scale, log_a_shift, delta_scale in ((3, 3.0, 2.0, 10.0), (4, 0.1, -6.0, 0.01)):
        t = make_inputs(1, 4, 8, 64, seed=seed, log_a_scale=log_a_scale, log_a_shift=log_a_shift,
                        delta_scale=delta_scale)
        out = call(ss.selective_scan_sequential, t, OPTION_SETS["plain"])
        ref = call(ss.selective_scan_loop, t, OPTION_SETS["plain"])
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
        assert_grads_close(grads(out, t), grads(ref, t), rtol=1e-3, atol=1e-4)


def test_sequential_refuses_double_backward() -> None:
    t = make_inputs(1, 2, 3, 5)
    out = call(ss.selective_scan_sequential, t, OPTION_SETS["plain"])
    (grad_u,) = torch.autograd.grad(out.square().sum(), [t["u"]], create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|double backward|differentiable"):
        grad_u.sum().backward()


@pytest.mark.parametrize("length, expected", [(1, "sequential"), (ss.SEQUENTIAL_MAX_LENGTH, "sequential"),
                                              (ss.SEQUENTIAL_MAX_LENGTH + 1, "chunked")])
def test_own_scan_picks_by_length(monkeypatch: pytest.MonkeyPatch, length: int, expected: str) -> None:
    monkeypatch.setenv(ss.ENV_VAR, "torch")
    called: list[str] = []
    for name, attribute in (("sequential", "selective_scan_sequential"), ("chunked", "selective_scan_torch")):
        original = getattr(ss, attribute)
        monkeypatch.setattr(ss, attribute, lambda *a, _o=original, _n=name, **k: called.append(_n) or _o(*a, **k))
    t = make_inputs(1, 2, 3, length)
    out = call(ss.selective_scan, t, OPTION_SETS["mamba"])
    assert called == [expected]
    torch.testing.assert_close(out, call(ss.selective_scan_loop, t, OPTION_SETS["mamba"]), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("length", [1, 5, 100, 333])
def test_last_state_matches_loop(length: int) -> None:
    t = make_inputs(2, 3, 4, length, seed=7)
    opts = OPTION_SETS["mamba"]
    out_ref, last_ref = call(ss.selective_scan_loop, t, opts, return_last_state=True)
    for chunk_len in (None, 3, 64):
        out, last = call(ss.selective_scan_torch, t, opts, return_last_state=True, chunk_len=chunk_len)
        assert last.shape == (2, 3, 4)
        torch.testing.assert_close(out, out_ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(last, last_ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "case, log_a_scale, log_a_shift, delta_scale",
    [
        ("strong decay", 3.0, 2.0, 10.0),  # delta * A down to about -1e5 per step: exp underflows to 0
        ("weak decay", 0.1, -6.0, 0.01),  # delta * A about -2e-5 per step: the state sums ~4096 inputs
    ],
)
def test_long_sequence_is_stable(case: str, log_a_scale: float, log_a_shift: float,
                                  delta_scale: float) -> None:
    length = 4096
    t = make_inputs(1, 4, 8, length, seed=3, log_a_scale=log_a_scale, log_a_shift=log_a_shift,
                    delta_scale=delta_scale)
    opts = OPTION_SETS["plain"]
    ref = call(ss.selective_scan_loop, t, opts)
    ref_grads = grads(ref, t)
    for chunk_len in (None, 512):
        out = call(ss.selective_scan_torch, t, opts, chunk_len=chunk_len)
        assert torch.isfinite(out).all(), case
        g = grads(out, t)
        assert all(torch.isfinite(v).all() for v in g.values() if v is not None), case
        scale = ref.abs().max().clamp(min=1.0)
        torch.testing.assert_close(out / scale, ref / scale, rtol=1e-4, atol=2e-5)
        assert_grads_close(g, ref_grads, rtol=1e-3, atol=1e-4)


def test_naive_log_space_scan_would_overflow() -> None:
    """Guards the premise of the design: exp(-cumsum(delta * A)) over a whole sequence is inf."""
    t = make_inputs(1, 2, 2, 4096, seed=5, log_a_scale=1.0, delta_scale=1.0)
    log_decay = (t["delta"][..., None] * t["A"][:, None, :]).detach()  # (1, d, L, n)
    assert not torch.isfinite(torch.exp(-torch.cumsum(log_decay, dim=2))).all()
    out = ss.selective_scan_torch(*(t[k] for k in ("u", "delta", "A", "B", "C")))
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_output_dtype_follows_u(dtype: torch.dtype) -> None:
    t = make_inputs(1, 3, 2, 20, dtype=dtype)
    out = call(ss.selective_scan_torch, t, OPTION_SETS["mamba"])
    ref = call(ss.selective_scan_loop, t, OPTION_SETS["mamba"])
    assert out.dtype == dtype and ref.dtype == dtype
    torch.testing.assert_close(out.float(), ref.float(), rtol=1e-2, atol=1e-2)


def test_shape_errors() -> None:
    t = make_inputs(2, 3, 4, 10)
    with pytest.raises(ValueError, match="B must be"):
        ss.selective_scan_torch(t["u"], t["delta"], t["A"], t["B"][:, :, :5], t["C"])
    with pytest.raises(ValueError, match="A must be"):
        ss.selective_scan_torch(t["u"], t["delta"], t["A"][:2], t["B"], t["C"])
    with pytest.raises(ValueError, match="chunk_len"):
        ss.selective_scan_torch(t["u"], t["delta"], t["A"], t["B"], t["C"], chunk_len=0)


# ---------------------------------------------------------------- backend choice


@pytest.fixture
def no_mamba(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ss, "mamba_ssm_scan_fn", lambda: (None, "No module named 'selective_scan_cuda'"))


@pytest.fixture
def fake_mamba(monkeypatch: pytest.MonkeyPatch) -> list:
    """Pretend mamba-ssm imports; record calls instead of running a kernel."""
    calls: list = []

    def fake_fn(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls.append(args)
        return args[0]

    monkeypatch.setattr(ss, "mamba_ssm_scan_fn", lambda: (fake_fn, None))
    return calls


def spy_torch_scan(monkeypatch: pytest.MonkeyPatch) -> list:
    calls: list = []
    original = ss.own_scan_for

    def spy(length: int):  # noqa: ANN202
        calls.append(length)
        return original(length)

    monkeypatch.setattr(ss, "own_scan_for", spy)
    return calls


def test_env_torch_forces_own_scan(monkeypatch: pytest.MonkeyPatch, fake_mamba: list) -> None:
    monkeypatch.setenv(ss.ENV_VAR, "torch")
    calls = spy_torch_scan(monkeypatch)
    t = make_inputs(1, 2, 3, 9)
    out = call(ss.selective_scan, t, OPTION_SETS["mamba"])
    assert len(calls) == 1 and not fake_mamba
    ref = call(ss.selective_scan_loop, t, OPTION_SETS["mamba"])
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert ss.describe_scan_backend().startswith("torch (forced")


@pytest.mark.parametrize("value", ["auto", "", "AUTO"])
def test_auto_uses_own_scan_for_cpu_tensors(monkeypatch: pytest.MonkeyPatch, fake_mamba: list,
                                            value: str) -> None:
    monkeypatch.setenv(ss.ENV_VAR, value)
    calls = spy_torch_scan(monkeypatch)
    call(ss.selective_scan, make_inputs(1, 2, 3, 9), OPTION_SETS["plain"])
    assert len(calls) == 1 and not fake_mamba
    assert ss.resolve_backend(torch.device("cuda")) == "mamba_ssm"


def test_auto_without_mamba_ssm(monkeypatch: pytest.MonkeyPatch, no_mamba: None) -> None:
    monkeypatch.delenv(ss.ENV_VAR, raising=False)
    assert ss.resolve_backend(torch.device("cuda")) == "torch"
    expected = "torch (mamba_ssm not importable: No module named 'selective_scan_cuda')"
    assert ss.describe_scan_backend() == expected


def test_env_mamba_ssm_not_importable_raises(monkeypatch: pytest.MonkeyPatch, no_mamba: None) -> None:
    monkeypatch.setenv(ss.ENV_VAR, "mamba_ssm")
    with pytest.raises(RuntimeError, match="not importable: No module named 'selective_scan_cuda'"):
        call(ss.selective_scan, make_inputs(1, 2, 3, 4), OPTION_SETS["plain"])
    assert "scans will raise" in ss.describe_scan_backend()


def test_env_mamba_ssm_on_cpu_tensors_raises(monkeypatch: pytest.MonkeyPatch, fake_mamba: list) -> None:
    monkeypatch.setenv(ss.ENV_VAR, "mamba_ssm")
    with pytest.raises(RuntimeError, match="only on CUDA tensors and these are on cpu"):
        call(ss.selective_scan, make_inputs(1, 2, 3, 4), OPTION_SETS["plain"])
    assert not fake_mamba


def test_env_mamba_ssm_on_cuda_dispatches(monkeypatch: pytest.MonkeyPatch, fake_mamba: list) -> None:
    monkeypatch.setenv(ss.ENV_VAR, "mamba_ssm")
    assert ss.resolve_backend(torch.device("cuda", 0)) == "mamba_ssm"


@pytest.mark.parametrize("value", ["cuda", "mamba", "loop", "1"])
def test_bad_env_value_raises(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv(ss.ENV_VAR, value)
    with pytest.raises(ValueError, match="auto, mamba_ssm, torch"):
        call(ss.selective_scan, make_inputs(1, 2, 3, 4), OPTION_SETS["plain"])
    assert ss.describe_scan_backend().startswith("invalid")


def test_real_detection_is_cached_and_explains(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ss.ENV_VAR, raising=False)
    ss.mamba_ssm_scan_fn.cache_clear()
    try:
        fn, reason = ss.mamba_ssm_scan_fn()
        assert (fn is None) != (reason is None)
        assert ss.mamba_ssm_scan_fn() == (fn, reason)
        assert ss.mamba_ssm_scan_fn.cache_info().hits >= 1
        text = ss.describe_scan_backend()
        if fn is None:
            assert text == f"torch (mamba_ssm not importable: {reason})"
        elif not torch.cuda.is_available():
            assert text.startswith("torch (mamba_ssm importable")
    finally:
        ss.mamba_ssm_scan_fn.cache_clear()


def test_production_code_never_fakes_modules() -> None:
    assert "sys.modules" not in inspect.getsource(ss)


# ---------------------------------------------------------------- GPU


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("length", [7, 1000])
def test_cuda_chunked_matches_loop(length: int) -> None:
    t = make_inputs(2, 8, 16, length, device="cuda")
    opts = OPTION_SETS["mamba"]
    ref = call(ss.selective_scan_loop, t, opts)
    for scan in (ss.selective_scan_torch, ss.selective_scan_sequential):
        out = call(scan, t, opts)
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
        assert_grads_close(grads(out, t), grads(ref, t))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_auto_backend_matches_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """With mamba-ssm importable this checks its kernel against the reference; else the own scan."""
    monkeypatch.delenv(ss.ENV_VAR, raising=False)
    ss.mamba_ssm_scan_fn.cache_clear()
    t = make_inputs(2, 8, 16, 300, device="cuda")
    opts = OPTION_SETS["mamba"]
    out = call(ss.selective_scan, t, opts)
    ref = call(ss.selective_scan_loop, t, opts)
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-3)
    assert_grads_close(grads(out, t), grads(ref, t), rtol=1e-3, atol=1e-3)
