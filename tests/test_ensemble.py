"""The DS + CS ensemble network: averaged probabilities, weights from DiffCL checkpoints."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nnunetv2_diffcl.diffusion_branch import DiffusionBranch
from nnunetv2_diffcl.ensemble import DSCSEnsemble, ensemble_parameters


class Constant(nn.Module):
    """Returns fixed logits whatever the input; records the timesteps it was called with."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = nn.Parameter(logits)
        self.calls = 0

    def forward(self, x: torch.Tensor, x_t: torch.Tensor | None = None, t: torch.Tensor | None = None) -> torch.Tensor:
        self.calls += 1
        return self.logits.expand(x.shape[0], -1, *x.shape[2:])


def test_ensemble_averages_probabilities():
    cs_logits = torch.tensor([2.0, 0.0]).view(1, 2, 1, 1)
    ds_logits = torch.tensor([-1.0, 1.0]).view(1, 2, 1, 1)
    ds = Constant(ds_logits)
    net = DSCSEnsemble(Constant(cs_logits), DiffusionBranch(ds, num_classes=2, timesteps=50, ddim_steps=3))
    out = net(torch.zeros(2, 1, 4, 4))
    expected = (torch.softmax(cs_logits, 1) + torch.softmax(ds_logits, 1)) / 2
    torch.testing.assert_close(torch.softmax(out, 1), expected.expand(2, 2, 4, 4))
    assert ds.calls == 3  # DS is sampled with the requested number of DDIM steps


def test_ensemble_parameters_from_checkpoints():
    checkpoint = {"network_weights": {"w": torch.ones(1)},
                  "semi_supervised": {"networks": {"ds": {"v": torch.zeros(1)}}}}
    assert list(ensemble_parameters([checkpoint])[0]) == ["cs.w", "ds.v"]
    with pytest.raises(ValueError, match="no diffusion branch"):
        ensemble_parameters([{"network_weights": {}, "trainer_name": "CPSTrainer"}])
