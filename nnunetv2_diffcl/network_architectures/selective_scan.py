"""Selective scan (the SSM recurrence inside Mamba) with interchangeable backends.

Every backend computes, for each batch b, channel d and state index n,

    h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t,    y_t = C_t . h_t + D * u_t

(then ``y * silu(z)`` when ``z`` is given), with mamba-ssm's argument conventions: ``u``/``delta``/``z``
are (batch, d, L), ``A`` is (d, n), ``B``/``C`` are (batch, n, L) (the input-dependent variant Mamba
uses), ``D`` and ``delta_bias`` are (d,).

Backends:
- ``mamba_ssm``: mamba-ssm's CUDA kernel, only when ``mamba_ssm`` imports and the tensors are on CUDA;
- ``torch``: this project's scans (any device, :func:`own_scan_for`): for sequences up to
  ``SEQUENTIAL_MAX_LENGTH`` tokens :func:`selective_scan_sequential` (one pass each way with a
  hand-written backward), above it :func:`selective_scan_torch` (chunked, differentiable by autograd,
  stable in float32 for long sequences);
- :func:`selective_scan_loop`: the plain step-by-step recurrence, kept as the reference for tests and
  benchmarks (never chosen automatically: it is slow).

The environment variable ``nnUNet_diffcl_scan`` (``auto`` | ``mamba_ssm`` | ``torch``, default ``auto``)
chooses the backend of :func:`selective_scan`. Whether mamba-ssm imports is checked once, lazily, on
first use; this module never fakes or patches mamba-ssm's modules.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

ENV_VAR = "nnUNet_diffcl_scan"
VALID_BACKENDS = ("auto", "mamba_ssm", "torch")

ScanResult = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


@functools.lru_cache(maxsize=1)
def mamba_ssm_scan_fn() -> tuple[Callable[..., ScanResult] | None, str | None]:
    """Return ``(selective_scan_fn, None)`` if mamba-ssm imports, else ``(None, reason)``.

    Cached because importing mamba-ssm is slow (it pulls in triton); tests that change what is
    importable call ``mamba_ssm_scan_fn.cache_clear()``. Any exception counts as "not importable":
    a broken CUDA install raises OSError or RuntimeError rather than ImportError.
    """
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception as exc:  # noqa: BLE001 - whatever breaks the import makes the backend unusable
        return None, str(exc) or type(exc).__name__
    return selective_scan_fn, None


def requested_backend() -> str:
    """The backend asked for by ``nnUNet_diffcl_scan`` (read on every call so tests can change it)."""
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if value not in VALID_BACKENDS:
        raise ValueError(
            f"{ENV_VAR}={os.environ.get(ENV_VAR)!r} is not valid; use one of {', '.join(VALID_BACKENDS)}"
        )
    return value


def resolve_backend(device: torch.device) -> str:
    """Pick ``"mamba_ssm"`` or ``"torch"`` for tensors on ``device``.

    ``auto`` uses the CUDA kernel where it can run and the own scan elsewhere; an explicit
    ``mamba_ssm`` that cannot run raises instead of silently falling back, so a misconfigured GPU
    machine is noticed rather than trained 10x slower.
    """
    wanted = requested_backend()
    if wanted == "torch":
        return "torch"
    fn, reason = mamba_ssm_scan_fn()
    if wanted == "mamba_ssm":
        if fn is None:
            raise RuntimeError(f"{ENV_VAR}=mamba_ssm, but mamba_ssm is not importable: {reason}")
        if device.type != "cuda":
            raise RuntimeError(
                f"{ENV_VAR}=mamba_ssm, but mamba_ssm's selective scan runs only on CUDA tensors and "
                f"these are on {device.type}; use {ENV_VAR}=auto or torch"
            )
        return "mamba_ssm"
    return "mamba_ssm" if (fn is not None and device.type == "cuda") else "torch"


def describe_scan_backend() -> str:
    """One line for ``doctor``: which backend runs and why. Never raises."""
    try:
        wanted = requested_backend()
    except ValueError as exc:
        return f"invalid ({exc})"
    if wanted == "torch":
        return f"torch (forced by {ENV_VAR}=torch)"
    fn, reason = mamba_ssm_scan_fn()
    cuda = torch.cuda.is_available()
    if wanted == "mamba_ssm":
        if fn is None:
            return f"mamba_ssm requested by {ENV_VAR}, but not importable ({reason}): scans will raise"
        if not cuda:
            return f"mamba_ssm requested by {ENV_VAR}, but CUDA is not available: scans will raise"
        return f"mamba_ssm (forced by {ENV_VAR}=mamba_ssm)"
    if fn is None:
        return f"torch (mamba_ssm not importable: {reason})"
    if not cuda:
        return "torch (mamba_ssm importable, but CUDA is not available)"
    return "mamba_ssm on CUDA tensors (torch for CPU tensors)"


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
) -> ScanResult:
    """Selective scan on the backend chosen by :func:`resolve_backend` (mamba-ssm's signature)."""
    if resolve_backend(u.device) == "mamba_ssm":
        fn, _ = mamba_ssm_scan_fn()
        assert fn is not None
        return fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    return own_scan_for(u.shape[-1])(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)


# Up to this many tokens the sequential scan is the faster one on the CPU (forward + backward, 2 threads,
# benchmarks/bench_selective_scan.py): 0.014 against 0.022 s at batch 6, d_inner 1024, 16 tokens (HF-Mamba at the 2d
# bottleneck of a 64 x 64 patch), 0.019 against 0.025 s at batch 2, d_inner 256, 216 tokens; from 1728 tokens on the
# chunked scan's fewer Python steps win (0.147 against 0.152 s, 4096: 0.347 against 0.407 s). docs/benchmarks.md
SEQUENTIAL_MAX_LENGTH = 256


def own_scan_for(length: int) -> Callable[..., ScanResult]:
    """The project's scan for a sequence of ``length`` tokens: sequential for short ones, chunked for long ones (the
    faster of the two)."""
    return selective_scan_sequential if length <= SEQUENTIAL_MAX_LENGTH else selective_scan_torch


def _check_shapes(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                  C: torch.Tensor) -> None:
    """Fail early with a readable message; broadcasting would otherwise hide a wrong layout."""
    if u.dim() != 3 or delta.shape != u.shape:
        raise ValueError(f"u and delta must be (batch, d, L); got {tuple(u.shape)}, {tuple(delta.shape)}")
    b, d, length = u.shape
    if A.dim() != 2 or A.shape[0] != d:
        raise ValueError(f"A must be (d={d}, n); got {tuple(A.shape)}")
    if A.is_complex():
        raise ValueError("complex A is not supported")
    n = A.shape[1]
    for name, t in (("B", B), ("C", C)):
        if tuple(t.shape) != (b, n, length):
            raise ValueError(f"{name} must be (batch={b}, n={n}, L={length}); got {tuple(t.shape)}")


def _prepare_delta(delta: torch.Tensor, delta_bias: torch.Tensor | None, softplus: bool) -> torch.Tensor:
    delta = delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias.float()[:, None]
    if softplus:
        delta = F.softplus(delta)
    return delta


def _finish(y: torch.Tensor, u: torch.Tensor, D: torch.Tensor | None, z: torch.Tensor | None,
            dtype_in: torch.dtype) -> torch.Tensor:
    if D is not None:
        y = y + u * D.float()[:, None]
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(dtype_in)


def selective_scan_loop(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
) -> ScanResult:
    """Reference: the recurrence one time step at a time, in float32.

    The sequence is split once with ``unbind`` (indexing inside the loop would make the backward
    pass quadratic in L). Slow, but obviously correct: tests and benchmarks compare against it.
    """
    _check_shapes(u, delta, A, B, C)
    dtype_in = u.dtype
    u32 = u.float()
    dt = _prepare_delta(delta, delta_bias, delta_softplus)
    a = A.float()
    b, d, _ = u.shape
    h = u32.new_zeros(b, d, a.shape[1])
    ys = []
    for dt_t, u_t, b_t, c_t in zip(dt.unbind(-1), u32.unbind(-1), B.float().unbind(-1), C.float().unbind(-1)):
        # dt_t, u_t: (b, d); b_t, c_t: (b, n)
        h = torch.exp(dt_t[:, :, None] * a) * h + (dt_t * u_t)[:, :, None] * b_t[:, None, :]
        ys.append(torch.einsum("bdn,bn->bd", h, c_t))
    y = torch.stack(ys, dim=-1) if ys else u32.new_zeros(u.shape)
    out = _finish(y, u32, D, z, dtype_in)
    return (out, h) if return_last_state else out


def default_chunk_len(length: int) -> int:
    """About sqrt(L): balances the 2 T steps inside chunks against the K = L / T steps across them."""
    return max(1, math.ceil(math.sqrt(length)))


def selective_scan_torch(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    chunk_len: int | None = None,
) -> ScanResult:
    """Chunked pure-PyTorch selective scan (float32 inside, output in ``u``'s dtype).

    The sequence is cut into K chunks of length T (``chunk_len``, default about sqrt(L)).
    1. All K chunks run their recurrence at once from a zero state (T vectorised steps), giving
       each chunk's own contribution to its end state.
    2. The state is carried chunk to chunk (K small steps), using the decay over a whole chunk,
       ``exp(sum of delta * A inside the chunk)``.
    3. All chunks run again from their true entering states (T steps) and read out y.
    Every exponent is either one step's ``delta * A`` or a sum of them over one chunk, all <= 0 for
    Mamba's A < 0: nothing overflows and no decay is ever divided out (which is what breaks a
    log-space cumulative sum over the whole sequence). 2T + K Python steps instead of L, each on
    tensors K times larger; about twice the loop's arithmetic. Plain autograd ops (steps taken with
    ``unbind``, never by indexing), so every input is differentiable.
    """
    return _own_scan(lambda *args: _chunked_recurrence(*args, chunk_len), u, delta, A, B, C, D, z, delta_bias,
                     delta_softplus, return_last_state)


def _chunked_recurrence(u32: torch.Tensor, dt: torch.Tensor, a32: torch.Tensor, b32: torch.Tensor, c32: torch.Tensor,
                        chunk_len: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(y without D and z, last state) of the chunked scan for a non-empty sequence, inputs in float32."""
    bsz, d, length = u32.shape
    t_len = default_chunk_len(length) if chunk_len is None else int(chunk_len)
    if t_len < 1:
        raise ValueError(f"chunk_len must be >= 1, got {chunk_len}")
    t_len = min(t_len, length)
    k_num = math.ceil(length / t_len)
    pad = k_num * t_len - length

    def to_chunks(x: torch.Tensor) -> torch.Tensor:
        # (batch, c, L) -> (T, K, batch, c), contiguous so that every time step is one dense slice.
        # Zero padding at the end means no decay (exp(0) = 1) and no input: the state passes unchanged.
        x = F.pad(x, (0, pad)) if pad else x
        return x.reshape(x.shape[0], x.shape[1], k_num, t_len).permute(3, 2, 0, 1).contiguous()

    dt_c = to_chunks(dt)  # (T, K, batch, d)
    dtu_c = to_chunks(dt * u32)
    b_steps = to_chunks(b32).unbind(0)  # T x (K, batch, n)
    c_steps = to_chunks(c32).unbind(0)
    # Per-step decay and input of all K chunks at once: T x (K, batch, d, n). unbind, never indexing:
    # an indexed step costs a full-size zero gradient in backward.
    decays = [torch.exp(dt_t[..., None] * a32) for dt_t in dt_c.unbind(0)]
    inputs = [dtu_t[..., None] * b_t[:, :, None, :] for dtu_t, b_t in zip(dtu_c.unbind(0), b_steps)]

    # 1. Each chunk's state at its end, starting from zero: T steps over all chunks in parallel.
    h = torch.zeros_like(inputs[0])
    for decay_t, input_t in zip(decays, inputs):
        h = decay_t * h + input_t
    # Decay over a whole chunk from the sum of its log-decays (a bounded sum, exponent <= 0).
    chunk_decay = torch.exp(dt_c.sum(0)[..., None] * a32)  # (K, batch, d, n)

    # 2. Carry the state from chunk to chunk: the state entering chunk k.
    carried = torch.zeros_like(h[0])
    entering = []
    for decay_k, end_k in zip(chunk_decay.unbind(0), h.unbind(0)):
        entering.append(carried)
        carried = decay_k * carried + end_k

    # 3. Re-run every chunk from its true entering state and read out y.
    h = torch.stack(entering)
    ys = []
    for decay_t, input_t, c_t in zip(decays, inputs, c_steps):
        h = decay_t * h + input_t
        ys.append(torch.einsum("kbdn,kbn->kbd", h, c_t))
    return torch.stack(ys).permute(2, 3, 1, 0).reshape(bsz, d, k_num * t_len)[..., :length], carried


def _own_scan(recurrence: Callable[..., tuple[torch.Tensor, torch.Tensor]], u: torch.Tensor, delta: torch.Tensor,
              A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, D: torch.Tensor | None, z: torch.Tensor | None,
              delta_bias: torch.Tensor | None, delta_softplus: bool, return_last_state: bool) -> ScanResult:
    """What the project's scans share around their recurrence: the shape checks, delta's bias and softplus, float32
    inside, an empty sequence, then D, z and the input's dtype. ``recurrence(u, dt, A, B, C)`` gets float32 tensors of
    a non-empty sequence and returns (y, last state)."""
    _check_shapes(u, delta, A, B, C)
    u32 = u.float()
    dt = _prepare_delta(delta, delta_bias, delta_softplus)
    bsz, d, length = u.shape
    if length == 0:
        y, last = u32.new_zeros(u.shape), u32.new_zeros(bsz, d, A.shape[1])
    else:
        y, last = recurrence(u32, dt, A.float(), B.float(), C.float())
    out = _finish(y, u32, D, z, u.dtype)
    return (out, last) if return_last_state else out


class _SequentialScan(torch.autograd.Function):
    """The recurrence without D, z and delta's preparation, in float32, with a hand-written backward.

    Forward: the decays ``exp(delta * A)`` and inputs ``delta * u * B`` of all steps at once, then one
    in-place multiply-add per step turns the inputs into the states (time-major, so a step is one dense
    slice), then y from all states in one batched product. Backward: the same in reverse, the state
    gradient carried back through the decays one step at a time and every parameter gradient read from
    the saved states and decays at once: two (L, batch, d, n) tensors are kept for the backward, and a
    step is one Python operation each way.
    """

    @staticmethod
    def forward(ctx, u: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,  # noqa: ANN001
                C: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        bsz, d, length = u.shape
        dt_l = dt.permute(2, 0, 1).contiguous()  # (L, batch, d)
        u_l = u.permute(2, 0, 1).contiguous()
        b_l = B.permute(2, 0, 1).contiguous()  # (L, batch, n)
        c_l = C.permute(2, 0, 1).contiguous()
        decays = torch.exp(dt_l[..., None] * A)  # (L, batch, d, n)
        states = (dt_l * u_l)[..., None] * b_l[:, :, None, :]  # the inputs, made states in place below
        for t in range(1, length):
            states[t].addcmul_(decays[t], states[t - 1])
        rows = length * bsz
        y = torch.bmm(states.view(rows, d, -1), c_l.view(rows, -1, 1)).view(length, bsz, d)
        ctx.save_for_backward(u_l, dt_l, A, b_l, c_l, decays, states)
        return y.permute(1, 2, 0), states[-1].clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: torch.Tensor, grad_last: torch.Tensor | None  # noqa: ANN001
                 ) -> tuple[torch.Tensor | None, ...]:
        u_l, dt_l, A, b_l, c_l, decays, states = ctx.saved_tensors
        length, bsz, d, n = states.shape
        rows = length * bsz
        gy = grad_y.permute(2, 0, 1).contiguous()  # (L, batch, d)
        flat_states = states.view(rows, d, n)
        grad_c = torch.bmm(flat_states.transpose(1, 2), gy.view(rows, d, 1)).view(length, bsz, n)
        # dloss/dstate_t: from y_t, plus what state t + 1 passes back through its decay
        grad_h = gy[..., None] * c_l[:, :, None, :]
        if grad_last is not None:
            grad_h[-1] += grad_last
        for t in range(length - 2, -1, -1):
            grad_h[t].addcmul_(decays[t + 1], grad_h[t + 1])
        flat_grad_h = grad_h.view(rows, d, n)
        grad_dtu = torch.bmm(flat_grad_h, b_l.view(rows, n, 1)).view(length, bsz, d)
        grad_b = torch.bmm(flat_grad_h.transpose(1, 2), (dt_l * u_l).view(rows, d, 1)).view(length, bsz, n)
        # dloss/d(delta * A): the decay multiplies the state before it (none before the first step)
        grad_exponent = torch.empty_like(grad_h)
        grad_exponent[0].zero_()
        torch.mul(grad_h[1:], states[:-1], out=grad_exponent[1:])
        grad_exponent.mul_(decays)
        grad_dt = grad_dtu * u_l + (grad_exponent * A).sum(-1)
        grad_a = (grad_exponent * dt_l[..., None]).sum((0, 1))
        grad_u = grad_dtu * dt_l
        return (grad_u.permute(1, 2, 0), grad_dt.permute(1, 2, 0), grad_a, grad_b.permute(1, 2, 0),
                grad_c.permute(1, 2, 0))


def selective_scan_sequential(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
) -> ScanResult:
    """The recurrence step by step in float32 with its own backward (no double backward): on the CPU the
    fastest of the project's scans for short sequences (``SEQUENTIAL_MAX_LENGTH``); L steps each way."""
    return _own_scan(_SequentialScan.apply, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
