"""DiffCLTrainer: terms, gradients, checkpoint and resume, variants, DDP logic, real commands."""

from __future__ import annotations

import os
import re
import socket

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.multiprocessing as mp

from nnunetv2_diffcl.trainers import diffcl
from nnunetv2_diffcl.trainers.semi_supervised import CHECKPOINT_KEY
from nnunetv2_diffcl.unlabeled.semi_supervised_loader import UNLABELED_KEY
from tests.conftest import DATASET_ID, LOGGED_TERM, command, run_command
from tests.trainers.test_cps_trainer import clone, make_trainer, supervised_loss

TERMS = {"cs_sup", "ds_sup", "cs_pseudo", "ds_pseudo", "contrast", "contrast_excess", "ds_cs_dice", "cs_dice_l",
         "ds_dice_l", "pseudo_kept"}


def fixed_batch(trainer) -> dict:
    """One real labeled + unlabeled batch from the trainer's own loaders (then the loaders stop)."""
    loaders, val = trainer.get_dataloaders()
    batch = next(loaders)
    loaders._finish()
    if hasattr(val, "_finish"):
        val._finish()
    return batch


class DiffCLTrainer_tiny(diffcl.DiffCLTrainer):
    """Fewer DDIM steps and a small bank keep in-process tests fast; the logic is DiffCLTrainer's."""

    ddim_steps = 2
    unsupervised_warmup_fraction = 0.0  # the unlabeled terms from the first step (tests/trainers/test_dynamics.py
    # tests the warm-up)
    bank_capacity = 64
    bank_samples_per_class = 16
    query_samples_per_class = 16


@pytest.fixture
def trainer(dataset_copy, in_process_env):
    in_process_env(dataset_copy)
    torch.manual_seed(0)
    return make_trainer(dataset_copy, DiffCLTrainer_tiny)


def test_networks_and_options(trainer):
    assert set(trainer.auxiliary) == {"ds", "projection_head", "memory_bank", "cs_ema"}
    assert trainer.auxiliary["memory_bank"].optimizer is None
    assert len(trainer.network.hf_mamba) == 1  # CS = planned network + HF-Mamba at the bottleneck
    assert trainer.diffusion.sampler.timesteps[0] == 999 and trainer.diffusion.sampler.timesteps[-1] == 0
    assert (trainer.mu1, trainer.mu2, trainer.eta, trainer.contrastive_temperature) == (1.0, 1.0, 0.1, 0.1)
    assert diffcl.DiffCLTrainer.ddim_steps == 2 and not trainer._do_i_compile()


def test_step_terms_and_every_parameter_gets_a_gradient(trainer):
    batch = fixed_batch(trainer)
    data, target, data_u = batch["data"], batch["target"], batch[UNLABELED_KEY]["data"]
    total, terms = trainer.compute_losses(data, target, data_u, weight=1.0)
    losses = {k: v for k, v in terms.items() if isinstance(v, torch.Tensor)}
    assert set(terms) == TERMS and set(losses) == {"cs_sup", "ds_sup", "cs_pseudo", "ds_pseudo", "contrast"}
    assert all(torch.isfinite(v) for v in losses.values())
    assert terms["contrast"].item() == 0.0  # first step: the bank is still empty
    assert int(trainer.auxiliary["memory_bank"].module.count.sum()) > 0  # ... and is filled now
    assert 0.0 <= terms["pseudo_kept"] <= 1.0
    total.backward()
    # DDP needs every parameter in the graph, even when a term is zero. The one exception is nnU-Net's
    # own: outside DDP its deep-supervision loss weights the lowest-resolution output 0 (1e-6 under DDP)
    lowest = {"decoder.seg_layers.0.weight", "decoder.seg_layers.0.bias"}
    for name, module in [("cs", trainer.network), ("ds", trainer.auxiliary["ds"].module),
                         ("head", trainer.auxiliary["projection_head"].module)]:
        missing = {n for n, p in module.named_parameters() if p.grad is None}
        assert missing <= lowest, f"{name}: no gradient for {sorted(missing - lowest)[:5]}"
    # second step: the bank has entries, the contrastive term is active
    _, terms = trainer.compute_losses(data, target, data_u, weight=1.0)
    assert terms["contrast"].item() > 0.0


def test_a_few_steps_lower_the_loss(trainer):
    """The total loss is no measure here: its contrastive term starts at step 2 and the DS term draws a
    random timestep each step. The CS network's supervised loss on the fixed batch is deterministic."""
    batch = fixed_batch(trainer)
    before = supervised_loss(trainer, batch)
    trainer.on_train_epoch_start()
    outputs = [trainer.train_step(clone(batch)) for _ in range(6)]
    assert all(np.isfinite(out["loss"]) for out in outputs)
    assert set(outputs[0]) >= TERMS | {"loss"}
    after = supervised_loss(trainer, batch)
    assert after < 0.5 * before, (before, after, [out["cs_sup"] for out in outputs])


def test_checkpoint_round_trip_restores_everything(trainer, dataset_copy):
    batch = fixed_batch(trainer)
    trainer.on_train_epoch_start()
    for _ in range(2):
        trainer.train_step(clone(batch))
    path = os.path.join(trainer.output_folder, "checkpoint_test.pth")
    trainer.save_checkpoint(path)
    state = torch.load(path, weights_only=False)[CHECKPOINT_KEY]
    assert set(state["networks"]) == {"ds", "projection_head", "memory_bank", "cs_ema"}
    assert set(state["optimizers"]) == {"ds", "projection_head"}

    torch.manual_seed(99)
    restored = make_trainer(dataset_copy, DiffCLTrainer_tiny)
    restored.load_checkpoint(path)
    assert restored.ssl_step == 2
    for name in ("ds", "projection_head", "memory_bank", "cs_ema"):
        mine, theirs = trainer.auxiliary[name].module.state_dict(), restored.auxiliary[name].module.state_dict()
        assert all(torch.equal(mine[k], theirs[k]) for k in mine), name
    bank = restored.auxiliary["memory_bank"].module
    assert torch.equal(bank.entries(1), trainer.auxiliary["memory_bank"].module.entries(1))
    # resumed and uninterrupted runs continue identically from the same state and the same randomness (from the next
    # epoch's start, where nnU-Net resumes: DS's cached pseudo-label of the epoch before is not in the checkpoint)
    trainer.on_train_epoch_start()
    restored.on_train_epoch_start()
    torch.manual_seed(5)
    a = trainer.train_step(clone(batch))
    torch.manual_seed(5)
    b = restored.train_step(clone(batch))
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)


def test_empty_and_single_class_pseudo_labels_never_nan(trainer):
    batch = fixed_batch(trainer)
    data, data_u = batch["data"], batch[UNLABELED_KEY]["data"]
    background_only = [torch.zeros_like(t) for t in batch["target"]]  # foreground absent in the batch
    # DS predicts nothing (an empty pseudo-label): background logits everywhere
    trainer.ds_pseudo_logits = lambda image, generator=None: torch.cat(
        [torch.full_like(image[:, :1], 10.0), torch.zeros_like(image[:, :1])], dim=1)
    for _ in range(2):
        total, terms = trainer.compute_losses(data, background_only, data_u, weight=1.0)
        assert torch.isfinite(total) and all(torch.isfinite(v) for v in terms.values()
                                             if isinstance(v, torch.Tensor)), terms
    assert int(trainer.auxiliary["memory_bank"].module.count[1]) == 0  # no foreground ever entered the bank


@pytest.mark.parametrize("cls", [diffcl.DiffCLTrainer_noHFMamba, diffcl.DiffCLTrainer_noContrastive,
                                 diffcl.DiffCLTrainer_noDiffusion, diffcl.DiffCLTrainer_DDIM1])
def test_each_variant_builds_and_takes_a_step(cls, dataset_copy, in_process_env):
    in_process_env(dataset_copy)
    trainer = make_trainer(dataset_copy, cls)
    batch = fixed_batch(trainer)
    trainer.on_train_epoch_start()
    out = trainer.train_step(batch)
    assert np.isfinite(out["loss"]) and set(out) >= TERMS
    if cls is diffcl.DiffCLTrainer_noHFMamba:
        assert len(trainer.network.hf_mamba) == 0
    if cls is diffcl.DiffCLTrainer_noContrastive:
        assert "projection_head" not in trainer.auxiliary and out["contrast"] == 0.0
    if cls is diffcl.DiffCLTrainer_noDiffusion:
        assert type(trainer.auxiliary["ds"].module) is type(trainer.network)
    if cls is diffcl.DiffCLTrainer_DDIM1:
        assert trainer.diffusion.sampler.timesteps == [999]


def _ddp_worker(rank: int, world: int, port: int, root: str, queue) -> None:
    """Two CPU ranks (gloo): each trains on its own batch; DDP must keep CS, DS, head and bank in sync."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from tests.conftest import PlannedDataset, nnunet_env

    dataset = PlannedDataset(__import__("pathlib").Path(root), {})
    os.environ.update({k: v for k, v in nnunet_env(dataset.root).items() if k.startswith("nnUNet")})
    torch.manual_seed(0)  # same initial weights on both ranks, as DDP's broadcast would make them
    trainer = make_trainer(dataset, DiffCLTrainer_tiny)
    batch = fixed_batch(trainer)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    trainer.network = DDP(trainer.network)
    for aux in trainer.auxiliary.values():
        if aux.optimizer is not None:
            aux.module = DDP(aux.module)
    trainer.is_ddp = True
    trainer.loss = trainer._build_loss()  # as nnU-Net builds it under DDP (every output weighted)
    torch.manual_seed(100 + rank)  # different noise, timesteps and data per rank
    trainer.on_train_epoch_start()
    for _ in range(2):  # a second step fails in DDP if a parameter went unused in the first
        b = clone(batch)
        b["data"] = b["data"] + 0.1 * rank
        trainer.train_step(b)
    digest = {name: float(sum(p.detach().double().sum() for p in m.parameters()))
              for name, m in [("cs", trainer.network), ("ds", trainer.auxiliary["ds"].module),
                              ("head", trainer.auxiliary["projection_head"].module)]}
    bank = trainer.auxiliary["memory_bank"].module
    queue.put((rank, digest, bank.count.tolist(), float(bank.features.double().sum())))
    torch.distributed.destroy_process_group()


def test_ddp_logic_on_two_cpu_processes(dataset_copy):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    processes = [ctx.Process(target=_ddp_worker, args=(r, 2, port, str(dataset_copy.root), queue)) for r in (0, 1)]
    for p in processes:
        p.start()
    results = sorted(queue.get(timeout=600) for _ in processes)
    for p in processes:
        p.join(timeout=60)
        assert p.exitcode == 0
    (_, digest0, count0, bank0), (_, digest1, count1, bank1) = results
    for name in digest0:
        assert digest0[name] == pytest.approx(digest1[name], rel=1e-6), name  # gradients were averaged
    assert count0 == count1 and bank0 == pytest.approx(bank1, rel=1e-6)  # the bank saw both ranks' samples


def test_refuses_without_unlabeled_data(dataset_copy, in_process_env):
    from nnunetv2_diffcl.unlabeled.preprocessing import UnlabeledDataError, manifest_file

    in_process_env(dataset_copy)
    os.remove(manifest_file(str(dataset_copy.preprocessed), "nnUNetPlans_3d_fullres"))
    trainer = make_trainer(dataset_copy, DiffCLTrainer_tiny)
    with pytest.raises(UnlabeledDataError, match="nnUNetv2_diffcl preprocess_unlabeled -d 991"):
        trainer.get_dataloaders()


def test_train_predict_resume_with_nnunet_commands(dataset_copy):
    env = {k: v for k, v in dataset_copy.env.items() if k != "nnUNet_extTrainer"}
    train = [command("nnUNetv2_train"), str(DATASET_ID), "3d_fullres", "all", "-tr", "DiffCLTrainer", "-device", "cpu"]
    run_command(train, {**env, "nnUNet_diffcl_epochs": "1"})
    fold = dataset_copy.results / "DiffCLTrainer__nnUNetPlans__3d_fullres" / "fold_all"
    log = "".join(p.read_text() for p in fold.glob("training_log_*.txt"))
    number = LOGGED_TERM
    assert re.search(rf"train terms: cs_sup {number}, ds_sup {number}, cs_pseudo {number}, ds_pseudo {number}, "
                     rf"contrast {number}, contrast_excess (nan|{number}), ds_cs_dice (nan|{number}), cs_dice_l "
                     rf"{number}, ds_dice_l (nan|{number}), pseudo_kept (nan|{number}), unsupervised_weight {number}, "
                     rf"grad_norm_cs {number}, grad_norm_ds {number}, grad_norm_projection_head {number}", log)
    assert (fold / "progress.png").exists()
    first = torch.load(fold / "checkpoint_final.pth", weights_only=False)
    assert first[CHECKPOINT_KEY]["ssl_step"] == 2 and "hf_mamba.0.mamba_forward.A_log" in (
        list(first["network_weights"]))

    out = dataset_copy.predict_test_set("DiffCLTrainer", env)
    prediction = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "syn_006.nii.gz")))
    assert prediction.shape == (32, 32, 32) and set(np.unique(prediction)) <= {0, 1}

    # the optional DS + CS ensemble, through nnU-Net's predictor
    ensemble = dataset_copy.root / "ensemble"
    run_command([command("nnUNetv2_diffcl"), "predict_ensemble", "-i", str(dataset_copy.raw / "imagesTs"), "-o",
                 str(ensemble), "-d", str(DATASET_ID), "-device", "cpu", "--disable_tta", "--ddim_steps", "2"], env)
    prediction = sitk.GetArrayFromImage(sitk.ReadImage(str(ensemble / "syn_006.nii.gz")))
    assert prediction.shape == (32, 32, 32) and set(np.unique(prediction)) <= {0, 1}

    run_command(train + ["--c"], {**env, "nnUNet_diffcl_epochs": "2"})
    resumed = torch.load(fold / "checkpoint_final.pth", weights_only=False)
    assert resumed["current_epoch"] == 2 and resumed[CHECKPOINT_KEY]["ssl_step"] == 4
    assert len(resumed["logging"]["train_ds_cs_dice"]) == 2 and len(resumed["logging"]["train_grad_norm_cs"]) == 2
    assert torch.equal(resumed[CHECKPOINT_KEY]["networks"]["memory_bank"]["count"] > 0,
                       torch.ones(2, dtype=torch.bool))
