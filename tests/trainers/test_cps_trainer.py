"""CPSTrainer and the semi-supervised machinery, in-process and through nnU-Net's real commands."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunetv2_diffcl.trainers.cps import CPSTrainer
from nnunetv2_diffcl.trainers.semi_supervised import CHECKPOINT_KEY, sigmoid_rampup
from nnunetv2_diffcl.unlabeled.preprocessing import UnlabeledDataError, manifest_file
from nnunetv2_diffcl.unlabeled.semi_supervised_loader import UNLABELED_KEY, SemiSupervisedBatches
from tests.conftest import DATASET_ID, LOGGED_TERM, command, run_command


def make_trainer(dataset, cls=CPSTrainer) -> CPSTrainer:
    plans = json.loads((dataset.preprocessed / "nnUNetPlans.json").read_text())
    plans["continue_training"] = False
    dataset_json = json.loads((dataset.preprocessed / "dataset.json").read_text())
    trainer = cls(plans, "3d_fullres", "all", dataset_json, torch.device("cpu"))
    trainer.initialize()
    return trainer


@pytest.fixture
def trainer(dataset_copy, in_process_env):
    in_process_env(dataset_copy)
    torch.manual_seed(0)
    trainer = make_trainer(dataset_copy)
    yield trainer
    if isinstance(trainer.dataloader_train, SemiSupervisedBatches):
        trainer.dataloader_train._finish()


def test_sigmoid_rampup():
    assert sigmoid_rampup(0.0) == pytest.approx(np.exp(-5))
    assert sigmoid_rampup(0.5) == pytest.approx(np.exp(-1.25))
    assert sigmoid_rampup(1.0) == 1.0 and sigmoid_rampup(7.0) == 1.0
    values = [sigmoid_rampup(x) for x in np.linspace(0, 1, 11)]
    assert all(a < b for a, b in zip(values, values[1:]))


def test_schedule_from_environment(trainer):
    assert (trainer.num_epochs, trainer.num_iterations_per_epoch, trainer.num_val_iterations_per_epoch) == (2, 2, 1)


def test_rampup_fraction_from_environment(dataset_copy, in_process_env, monkeypatch):
    in_process_env(dataset_copy)
    monkeypatch.setenv("nnUNet_diffcl_warmup_fraction", "0")
    monkeypatch.setenv("nnUNet_diffcl_rampup_fraction", "0.5")
    trainer = make_trainer(dataset_copy)
    total = trainer.num_epochs * trainer.num_iterations_per_epoch
    trainer.ssl_step = total // 4  # half-way through a ramp over half of training
    assert trainer.unsupervised_weight() == pytest.approx(sigmoid_rampup(0.5))
    trainer.ssl_step = total // 2
    assert trainer.unsupervised_weight() == pytest.approx(1.0)
    monkeypatch.setenv("nnUNet_diffcl_rampup_fraction", "1.5")
    with pytest.raises(ValueError, match="nnUNet_diffcl_rampup_fraction.* must lie in"):
        make_trainer(dataset_copy)


def test_batch_contract(trainer):
    trainer.dataloader_train, trainer.dataloader_val = trainer.get_dataloaders()
    batch = next(trainer.dataloader_train)
    data, target, unlabeled = batch["data"], batch["target"], batch[UNLABELED_KEY]["data"]
    patch = tuple(trainer.configuration_manager.patch_size)
    assert trainer.batch_size == trainer.configuration_manager.batch_size == 2
    assert data.shape == unlabeled.shape == (2, 1, *patch)
    assert data.dtype == unlabeled.dtype == torch.float32
    # deep supervision targets as nnU-Net makes them, one per decoder output resolution
    assert isinstance(target, list) and len(target) == len(trainer.configuration_manager.pool_op_kernel_sizes) - 1
    assert tuple(target[0].shape) == (2, 1, *patch) and tuple(target[1].shape) == (2, 1, *(p // 2 for p in patch))
    assert set(torch.unique(target[0]).tolist()) <= {0, 1}
    # augmented (not raw) unlabeled data: normalised intensities, and not the labeled patch
    assert abs(float(unlabeled.mean())) < 3 and not torch.equal(unlabeled, data)
    loader_u = trainer.dataloader_train.unlabeled.data_loader
    assert loader_u.transforms is trainer.dataloader_train.labeled.data_loader.transforms
    assert sorted(loader_u._data.identifiers) == ["copy_of_syn_000", "syn_003", "syn_004", "syn_005"]
    assert loader_u.oversample_foreground_percent == 0.0


def test_unlabeled_batch_follows_the_per_rank_batch_size(trainer):
    # under DDP nnU-Net sets self.batch_size to this rank's share; the unlabeled batch uses the same
    trainer.batch_size = 1
    loaders, _ = trainer.get_dataloaders()
    batch = next(loaders)
    loaders._finish()
    assert batch["data"].shape[0] == batch[UNLABELED_KEY]["data"].shape[0] == 1


def test_worker_processes_are_shut_down(trainer, monkeypatch):
    monkeypatch.setenv("nnUNet_n_proc_DA", "1")
    loaders, val = trainer.get_dataloaders()
    next(loaders)
    workers = loaders.unlabeled._processes + loaders.labeled._processes
    assert workers and all(p.is_alive() for p in workers)
    loaders._finish()
    val._finish()
    assert not any(p.is_alive() for p in workers)


def test_networks_start_different(trainer):
    a = dict(trainer.network.named_parameters())
    b = dict(trainer.auxiliary["network_b"].module.named_parameters())
    assert a.keys() == b.keys()
    assert not torch.equal(a["encoder.stages.0.0.convs.0.conv.weight"], b["encoder.stages.0.0.convs.0.conv.weight"])
    assert trainer.auxiliary["network_b"].optimizer is not trainer.optimizer


def clone(batch: dict) -> dict:
    """A fresh copy of a labeled + unlabeled batch, so that one batch can be trained on again and again."""
    return {"data": batch["data"].clone(), "target": [t.clone() for t in batch["target"]],
            UNLABELED_KEY: {"data": batch[UNLABELED_KEY]["data"].clone()}}


def supervised_loss(trainer, batch: dict) -> float:
    """The planned network's own nnU-Net loss on a labeled batch. Not the total loss: its unsupervised
    weight ramps up step by step, so a rising total says nothing about learning."""
    with torch.no_grad():
        return float(trainer.loss(trainer.network(batch["data"]), batch["target"]))


def test_a_few_steps_lower_the_loss(trainer):
    trainer.dataloader_train, trainer.dataloader_val = trainer.get_dataloaders()
    batch = next(trainer.dataloader_train)
    before = supervised_loss(trainer, batch)
    trainer.on_train_epoch_start()
    outputs = [trainer.train_step(clone(batch)) for _ in range(8)]
    assert all(set(out) == {"loss", "sup_a", "sup_b", "pseudo_a", "pseudo_b", "unsupervised_weight", "grad_norm_a",
                            "grad_norm_network_b"} for out in outputs)
    weights = [out["unsupervised_weight"] for out in outputs]
    assert weights[0] == 0.0 and weights[-1] == 1.0  # the warm-up (one of 4 steps), then the unlabeled terms
    assert trainer.ssl_step == 8 and all(np.isfinite(out["loss"]) for out in outputs)
    after = supervised_loss(trainer, batch)
    assert after < 0.5 * before, (before, after, [out["sup_a"] for out in outputs])


def test_non_finite_loss_skips_the_step(trainer, monkeypatch):
    trainer.dataloader_train, trainer.dataloader_val = trainer.get_dataloaders()
    batch = next(trainer.dataloader_train)
    before = {k: v.clone() for k, v in trainer.network.state_dict().items()}
    monkeypatch.setattr(trainer, "compute_losses", lambda *a: (torch.tensor(float("nan"), requires_grad=True),
                                                               {t: torch.tensor(0.0) for t in trainer.loss_terms}))
    out = trainer.train_step(batch)
    assert np.isnan(out["loss"])
    after = trainer.network.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    log = Path(trainer.log_file).read_text()
    assert "non-finite loss" in log and "step skipped" in log


def test_checkpoint_round_trip(trainer, dataset_copy):
    trainer.dataloader_train, trainer.dataloader_val = trainer.get_dataloaders()
    trainer.on_train_epoch_start()
    for _ in range(2):
        trainer.train_step(next(trainer.dataloader_train))
    trainer.dataloader_train._finish()
    path = str(Path(trainer.output_folder) / "checkpoint_test.pth")
    trainer.save_checkpoint(path)
    assert not os.path.exists(path + ".partial")
    checkpoint = torch.load(path, weights_only=False)
    assert set(checkpoint[CHECKPOINT_KEY]) == {"ssl_step", "networks", "optimizers", "extra"}
    # network_weights is network A alone, loadable by nnU-Net's predictor as is
    assert checkpoint["network_weights"].keys() == trainer.network.state_dict().keys()

    torch.manual_seed(123)
    restored = make_trainer(dataset_copy)
    restored.load_checkpoint(path)
    assert restored.ssl_step == 2
    for name in ("network_b", "ema_a", "ema_b"):  # the EMA teachers are restored too
        mine = trainer.auxiliary[name].module.state_dict()
        theirs = restored.auxiliary[name].module.state_dict()
        assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    for name in ("network_b",):
        mine = trainer.auxiliary[name].module.state_dict()
        theirs = restored.auxiliary[name].module.state_dict()
        assert all(torch.equal(mine[k], theirs[k]) for k in mine)
        momentum = restored.auxiliary[name].optimizer.state_dict()["state"]
        assert momentum and all(torch.equal(momentum[i]["momentum_buffer"],
                                            trainer.auxiliary[name].optimizer.state_dict()["state"][i]["momentum_buffer"])
                                for i in momentum)


def test_refuses_to_start_without_unlabeled_data(dataset_copy, in_process_env):
    in_process_env(dataset_copy)
    os.remove(manifest_file(str(dataset_copy.preprocessed), "nnUNetPlans_3d_fullres"))
    trainer = make_trainer(dataset_copy)
    with pytest.raises(UnlabeledDataError, match=r"run `nnUNetv2_diffcl preprocess_unlabeled -d 991 -c 3d_fullres"):
        trainer.get_dataloaders()
    for f in os.listdir(dataset_copy.raw / "imagesTu"):
        os.remove(dataset_copy.raw / "imagesTu" / f)
    with pytest.raises(UnlabeledDataError, match="imagesTu is empty"):
        trainer.get_dataloaders()


def test_train_predict_resume_with_nnunet_commands(dataset_copy):
    """The user's workflow: nnUNetv2_train -tr CPSTrainer, nnUNetv2_predict -tr CPSTrainer, then --c."""
    env = {k: v for k, v in dataset_copy.env.items() if k != "nnUNet_extTrainer"}  # discovery via the hook
    train = [command("nnUNetv2_train"), str(DATASET_ID), "3d_fullres", "all", "-tr", "CPSTrainer", "-device", "cpu"]
    run_command(train, env)
    fold = dataset_copy.results / "CPSTrainer__nnUNetPlans__3d_fullres" / "fold_all"
    assert {"checkpoint_final.pth", "progress.png", "debug.json"} <= set(os.listdir(fold))
    log = "".join(p.read_text() for p in fold.glob("training_log_*.txt"))
    number = LOGGED_TERM
    assert len(re.findall(rf"train terms: sup_a {number}, sup_b {number}, pseudo_a {number}, pseudo_b {number}, "
                          rf"unsupervised_weight {number}, grad_norm_a {number}, grad_norm_network_b {number}",
                          log)) == 2
    first = torch.load(fold / "checkpoint_final.pth", weights_only=False)
    assert first[CHECKPOINT_KEY]["ssl_step"] == 4 and len(first["logging"]["train_pseudo_a"]) == 2

    out = dataset_copy.predict_test_set("CPSTrainer", env)
    for case in ("syn_006", "syn_007"):
        prediction = sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{case}.nii.gz")))
        reference = sitk.GetArrayFromImage(sitk.ReadImage(str(dataset_copy.raw / "labelsTs" / f"{case}.nii.gz")))
        assert prediction.shape == reference.shape and set(np.unique(prediction)) <= {0, 1}

    # resume: one more epoch on top of the finished two, continuing from the saved state
    run_command(train + ["--c"], {**env, "nnUNet_diffcl_epochs": "3"})
    resumed = torch.load(fold / "checkpoint_final.pth", weights_only=False)
    assert resumed["current_epoch"] == 3
    assert resumed[CHECKPOINT_KEY]["ssl_step"] == 6  # 4 restored + 2 new; a fresh start would give 2
    assert len(resumed["logging"]["train_sup_b"]) == 3
    assert resumed["logging"]["train_sup_b"][:2] == first["logging"]["train_sup_b"]
    b_before = first[CHECKPOINT_KEY]["networks"]["network_b"]
    b_after = resumed[CHECKPOINT_KEY]["networks"]["network_b"]
    assert any(not torch.equal(b_before[k], b_after[k]) for k in b_before)  # B kept training
