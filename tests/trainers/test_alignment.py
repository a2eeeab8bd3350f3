"""Distribution alignment of the teachers' pseudo-labels: class shares of the labeled cases, known aligned values,
the running mean's arithmetic, a finite step for CPS and DiffCL, and resume restoring the running shares."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from nnunetv2_diffcl.trainers import cps, diffcl
from nnunetv2_diffcl.trainers.semi_supervised import ClassShares, labeled_class_shares
from tests.trainers.test_cps_trainer import clone, make_trainer
from tests.trainers.test_diffcl_trainer import fixed_batch
from tests.trainers.test_dynamics import unbuilt


class _Cases:
    """A stand-in for nnU-Net's dataset: identifiers and load_case's (data, seg, seg_prev, properties)."""

    def __init__(self, segs: dict[str, np.ndarray]) -> None:
        self.segs = segs
        self.identifiers = list(segs)

    def load_case(self, identifier: str):
        return None, self.segs[identifier], None, {}


def test_labeled_class_shares_count_every_case_and_skip_outside_voxels():
    cases = _Cases({"a": np.array([[0, 0, 1, 2]]), "b": np.array([[0, 1, -1, -1]])})  # -1: outside the mask
    # counted voxels: 0, 0, 1, 2, 0, 1 -> shares 3/6, 2/6, 1/6
    torch.testing.assert_close(labeled_class_shares(cases, 3), torch.tensor([0.5, 1 / 3, 1 / 6]))
    with pytest.raises(RuntimeError, match="empty"):
        labeled_class_shares(_Cases({"a": np.array([[-1, -1]])}), 3)


def test_running_shares_start_at_the_first_batch_then_average():
    shares = ClassShares(2, ["cs", "ds"], momentum=0.9)
    torch.testing.assert_close(shares.update("cs", torch.tensor([0.8, 0.2])), torch.tensor([0.8, 0.2]))
    torch.testing.assert_close(shares.update("cs", torch.tensor([0.6, 0.4])), torch.tensor([0.78, 0.22]))
    torch.testing.assert_close(shares.running[1], torch.tensor([0.5, 0.5]))  # "ds" untouched


@pytest.mark.parametrize("cls", [cps.CPSTrainer_aligned, diffcl.DiffCLTrainer_aligned])
def test_aligned_known_values_step_and_resume(dataset_copy, in_process_env, cls):
    in_process_env(dataset_copy)
    torch.manual_seed(0)
    tiny = type("Tiny", (cls,), {"ddim_steps": 2})
    trainer = make_trainer(dataset_copy, tiny)
    record = trainer.auxiliary["class_shares"].module
    # the first batch sets the running share; with the same probabilities p in every voxel it equals p, so the
    # aligned probabilities p * labeled / p are the labeled shares themselves
    k = trainer.label_manager.num_segmentation_heads
    labeled = torch.linspace(1.0, 2.0, k)
    record.set_labeled(labeled / labeled.sum())
    p = torch.linspace(3.0, 1.0, k)
    p = p / p.sum()
    logits = torch.log(p).reshape(1, k, 1, 1, 1).expand(2, k, 2, 3, 2)
    out = torch.softmax(trainer.aligned(trainer.primary_name, logits), 1)
    torch.testing.assert_close(out, (labeled / labeled.sum()).reshape(1, k, 1, 1, 1).expand_as(out))
    # the second teacher keeps its own running share: untouched by the first one's batch
    other = [n for n in record.teachers if n != trainer.primary_name][0]
    assert not bool(record.started[record.teachers.index(other)])

    batch = fixed_batch(trainer)
    trainer.on_train_epoch_start()
    trainer.ssl_step = 10 ** 6
    assert np.isfinite(trainer.train_step(clone(batch))["loss"])
    assert bool(record.started[record.teachers.index(trainer.primary_name)])
    path = os.path.join(trainer.output_folder, "checkpoint_test.pth")
    trainer.save_checkpoint(path)
    restored = make_trainer(dataset_copy, tiny)
    restored.load_checkpoint(path)
    mine, theirs = record.state_dict(), restored.auxiliary["class_shares"].module.state_dict()
    assert all(torch.equal(mine[name], theirs[name]) for name in mine)


def test_bad_alignment_momentum_is_refused(dataset_copy, in_process_env):
    in_process_env(dataset_copy)
    with pytest.raises(ValueError, match=r"alignment_momentum must lie in \[0, 1\)"):
        unbuilt(dataset_copy, type("Bad", (cps.CPSTrainer_aligned,), {"alignment_momentum": 1.0}))
