"""A Mamba (selective state space) layer that is checkpoint-compatible with ``mamba_ssm.Mamba``.

Parameter names, shapes and initialisation follow mamba-ssm's ``Mamba`` block (in_proj, conv1d,
x_proj, dt_proj, A_log, D, out_proj), so weights trained on a GPU with mamba-ssm load here strictly on
a CPU, and the reverse. The scan runs on the backend chosen by
:func:`nnunetv2_diffcl.network_architectures.selective_scan.selective_scan` (mamba-ssm's CUDA kernel
where it can run, the project's chunked PyTorch scan elsewhere). Only the full-sequence forward is
implemented: segmentation never decodes token by token, so there is no inference cache.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from nnunetv2_diffcl.network_architectures.selective_scan import selective_scan


class Mamba(nn.Module):
    """Mamba block: (batch, L, d_model) -> (batch, L, d_model), always computed in float32.

    Mixed precision has produced NaNs in other Mamba nnU-Nets (the exponentials of the scan), so
    autocast is switched off inside and the input cast to float32; the output is cast back to the
    input's dtype so the surrounding network keeps its precision.
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | str = "auto",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init: str = "random",
        dt_scale: float = 1.0,
        dt_init_floor: float = 1e-4,
        conv_bias: bool = True,
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if dt_init not in ("random", "constant"):
            raise ValueError(f"dt_init must be 'random' or 'constant', got {dt_init!r}")
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"need 0 < dt_min <= dt_max, got {dt_min}, {dt_max}")
        factory = {"device": device, "dtype": dtype}
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.expand = expand
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)

        # Creation order matters: with the same seed it reproduces mamba-ssm's random draws exactly.
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias, **factory)
        # Depthwise causal convolution: pad d_conv - 1 on both sides and keep the first L outputs.
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, kernel_size=d_conv, groups=self.d_inner,
                                padding=d_conv - 1, bias=conv_bias, **factory)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False, **factory)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True, **factory)

        # dt_proj.weight scaled so the dt pre-activation has about unit variance at start.
        std = dt_scale / math.sqrt(self.dt_rank)
        with torch.no_grad():
            if dt_init == "constant":
                self.dt_proj.weight.fill_(std)
            else:
                self.dt_proj.weight.uniform_(-std, std)
            # Bias = softplus^{-1}(dt) with dt log-uniform in [dt_min, dt_max], so the initial step
            # sizes cover slow and fast time scales.
            log_span = math.log(dt_max) - math.log(dt_min)
            log_dt = torch.rand(self.d_inner, **factory) * log_span + math.log(dt_min)
            dt = torch.exp(log_dt).clamp(min=dt_init_floor)
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        # Marks read by mamba-ssm-style init / optimiser code: keep this bias, no weight decay on A, D.
        self.dt_proj.bias._no_reinit = True

        # S4D-real initialisation A = -(1..d_state) per channel, stored as log so A stays negative.
        a_init = torch.arange(1, d_state + 1, dtype=torch.float32, device=device).repeat(self.d_inner, 1)
        self.A_log = nn.Parameter(torch.log(a_init))
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.ones(self.d_inner, device=device))
        self.D._no_weight_decay = True

        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **factory)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(batch, L, d_model) -> (batch, L, d_model), in the input's dtype."""
        if hidden_states.dim() != 3 or hidden_states.shape[-1] != self.d_model:
            raise ValueError(f"expected (batch, L, {self.d_model}), got {tuple(hidden_states.shape)}")
        dtype_in = hidden_states.dtype
        with torch.autocast(device_type=hidden_states.device.type, enabled=False):
            out = self._forward_fp32(hidden_states.float())
        return out.to(dtype_in)

    def _forward_fp32(self, x_in: torch.Tensor) -> torch.Tensor:
        seqlen = x_in.shape[1]
        xz = self.in_proj(x_in).transpose(1, 2)  # (batch, 2 * d_inner, L)
        x, z = xz.chunk(2, dim=1)
        x = F.silu(self.conv1d(x)[..., :seqlen])
        x_dbl = self.x_proj(x.transpose(1, 2))  # (batch, L, dt_rank + 2 * d_state)
        dt, b_in, c_in = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        # dt_proj's bias goes into the scan as delta_bias (added before softplus), as in mamba-ssm.
        delta = F.linear(dt, self.dt_proj.weight).transpose(1, 2)  # (batch, d_inner, L)
        y = selective_scan(
            x.contiguous(),
            delta.contiguous(),
            -torch.exp(self.A_log.float()),
            b_in.transpose(1, 2).contiguous(),
            c_in.transpose(1, 2).contiguous(),
            self.D.float(),
            z=z.contiguous(),
            delta_bias=self.dt_proj.bias.float(),
            delta_softplus=True,
        )
        return self.out_proj(y.transpose(1, 2))
