"""The training dynamics of the semi-supervised trainers: warm-up, ramp, masked pseudo-labels, copy-paste,
EMA teachers, their checks, checkpoints, and the diagnostics DiffCL logs."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
from torch import nn

from nnunetv2_diffcl.losses.contrastive import infonce_floor, supervised_infonce
from nnunetv2_diffcl.losses.pseudo_labels import (
    copy_paste,
    foreground_dice,
    label_and_confidence,
    masked_pseudo_label,
    random_boxes,
)
from nnunetv2_diffcl.trainers import cps, diffcl
from nnunetv2_diffcl.trainers.semi_supervised import CHECKPOINT_KEY, ema_update, sigmoid_rampup
from nnunetv2_diffcl.unlabeled.semi_supervised_loader import UNLABELED_KEY
from tests.trainers.test_cps_trainer import clone, make_trainer
from tests.trainers.test_diffcl_trainer import DiffCLTrainer_tiny, fixed_batch


def unbuilt(dataset, cls):
    """A trainer constructed (options checked) but not initialised: what nnUNetv2_train does first."""
    plans = json.loads((dataset.preprocessed / "nnUNetPlans.json").read_text())
    plans["continue_training"] = False
    dataset_json = json.loads((dataset.preprocessed / "dataset.json").read_text())
    return cls(plans, "3d_fullres", "all", dataset_json, torch.device("cpu"))


# ------------------------------------------------------------------------------------------ pure functions
def test_ema_update_arithmetic():
    torch.manual_seed(0)
    model, ema = nn.BatchNorm1d(3), nn.BatchNorm1d(3)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([1.0, 2.0, 3.0]))
        ema.weight.copy_(torch.tensor([3.0, 2.0, 1.0]))
        model.running_mean.copy_(torch.tensor([5.0, 6.0, 7.0]))
    ema_update(ema, model, decay=0.75)
    # 0.75 * ema + 0.25 * model
    torch.testing.assert_close(ema.weight, torch.tensor([2.5, 2.0, 1.5]))
    torch.testing.assert_close(ema.running_mean, torch.tensor([5.0, 6.0, 7.0]))  # buffers are copied
    ema_update(ema, model, decay=0.0)
    torch.testing.assert_close(ema.weight, model.weight)


@pytest.mark.parametrize("spatial", [(8, 12), (6, 8, 10)])
def test_copy_paste_mixes_images_and_labels_with_the_same_box(spatial):
    generator = torch.Generator().manual_seed(3)
    box = random_boxes(4, spatial, 0.5, torch.device("cpu"), generator)
    assert box.shape == (4, 1, *spatial) and box.dtype == torch.bool
    side = [round(0.5 * s) for s in spatial]
    assert all(int(b.sum()) == math.prod(side) for b in box)  # one box of half the patch along every axis
    image_u, image_l = torch.zeros(4, 2, *spatial), torch.ones(4, 2, *spatial)
    label_u, label_l = torch.zeros(4, 1, *spatial, dtype=torch.int16), torch.ones(4, 1, *spatial, dtype=torch.int16)
    mixed_image, mixed_label = copy_paste(image_u, image_l, box), copy_paste(label_u, label_l, box)
    for channel in range(2):  # every channel pasted where the label is pasted, nowhere else
        assert torch.equal(mixed_image[:, channel:channel + 1] == 1, mixed_label == 1)
    assert torch.equal(mixed_label == 1, box)
    with pytest.raises(ValueError, match="matching batch and spatial shapes"):
        copy_paste(image_u, image_l[:2], box)


def test_label_confidence_and_mask():
    logits = torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0]]).T.reshape(1, 2, 2)  # voxel 0: p(1)=0.75; 1: 0.5
    label, confidence = label_and_confidence(logits)
    assert label.tolist() == [[[1, 0]]] and confidence.flatten().tolist() == pytest.approx([0.75, 0.5])
    masked = masked_pseudo_label(label, confidence >= 0.6, ignore_value=2)
    assert masked.tolist() == [[[1, 2]]]


def test_foreground_dice_known_values():
    a = torch.tensor([[0, 1, 1, 2]])
    b = torch.tensor([[0, 1, 0, 0]])
    # class 1: 2*1 / (2 + 1) = 2/3; class 2: 0 / (1 + 0) = 0; mean 1/3
    assert foreground_dice(a, b, 3) == pytest.approx(1 / 3)
    assert math.isnan(foreground_dice(torch.zeros(4), torch.zeros(4), 3))  # nothing to measure


def test_infonce_floor_known_value_and_bound():
    query_labels, key_labels = torch.tensor([0, 0, 1, 2]), torch.tensor([0, 0, 0, 1])
    # positives per query: 3, 3, 1 (class 2 has no key and is left out) -> mean of ln 3, ln 3, ln 1
    assert infonce_floor(query_labels, key_labels) == pytest.approx(2 * math.log(3) / 3)
    torch.manual_seed(0)
    queries = nn.functional.normalize(torch.randn(4, 8), dim=1)
    keys = nn.functional.normalize(torch.randn(4, 8), dim=1)
    loss = supervised_infonce(queries, query_labels, keys, key_labels, 0.1)
    assert float(loss) >= infonce_floor(query_labels, key_labels) - 1e-6


# ------------------------------------------------------------------------------------------ schedule and checks
def test_warmup_then_sigmoid_ramp(dataset_copy, in_process_env):
    in_process_env(dataset_copy)

    class Schedule(cps.CPSTrainer):
        unsupervised_warmup_fraction = 0.25
        unsupervised_rampup_fraction = 0.5

    trainer = unbuilt(dataset_copy, Schedule)
    trainer.num_epochs, trainer.num_iterations_per_epoch = 10, 10  # 100 steps: warm-up 25, ramp 50
    for step, expected in ((0, 0.0), (24, 0.0), (25, sigmoid_rampup(0.0)), (50, sigmoid_rampup(0.5)),
                           (75, 1.0), (99, 1.0)):
        trainer.ssl_step = step
        assert trainer.unsupervised_weight() == pytest.approx(expected), step


@pytest.mark.parametrize("cls", [cps.CPSTrainer_lateStart, diffcl.DiffCLTrainer_lateStart])
def test_late_start_teaches_only_in_the_second_half(dataset_copy, in_process_env, cls):
    in_process_env(dataset_copy)
    trainer = unbuilt(dataset_copy, cls)
    trainer.num_epochs, trainer.num_iterations_per_epoch = 20, 10  # 200 steps: warm-up 100, ramp 40
    for step, expected in ((99, 0.0), (100, sigmoid_rampup(0.0)), (120, sigmoid_rampup(0.5)), (140, 1.0)):
        trainer.ssl_step = step
        assert trainer.unsupervised_weight() == pytest.approx(expected), step


@pytest.mark.parametrize("attribute, value, message", [
    ("pseudo_label_threshold", 0.0, "pseudo_label_threshold .* strictly between 0 and 1"),
    ("pseudo_label_threshold", 1.0, "pseudo_label_threshold .* strictly between 0 and 1"),
    ("unsupervised_warmup_fraction", -0.1, r"unsupervised_warmup_fraction .* must lie in \[0, 1\]"),
    ("unsupervised_rampup_fraction", 1.5, r"unsupervised_rampup_fraction .* must lie in \[0, 1\]"),
    ("unsupervised_warmup_fraction", 0.9, "exceeds 1"),  # + the default ramp
    ("student_perturbation", "mixup", "student_perturbation must be one of"),
    ("ema_decay", 1.0, r"ema_decay must lie in \[0, 1\)"),
    ("pasted_appearance", "style", "pasted_appearance must be one of"),
    ("labeled_appearance", "fft", "labeled_appearance must be one of"),
    ("student_appearance", "labeled", "student_appearance must be one of"),  # a name of the labeled patch
    ("background_threshold", 1.0, "background_threshold must lie strictly between 0 and 1"),
    ("labeled_bias_field", -0.5, r"labeled_bias_field must lie in \[0, 3\]"),
    ("student_bias_field", 3.5, r"student_bias_field must lie in \[0, 3\]"),
    ("appearance_mix_range", (0.6, 0.2), r"appearance_mix_range must be \(low, high\) with 0 <= low <= high <= 1"),
    ("appearance_mix_range", (0.0, 1.5), r"appearance_mix_range must be \(low, high\)"),
])
def test_bad_dynamics_are_refused_before_training(dataset_copy, in_process_env, attribute, value, message):
    in_process_env(dataset_copy)
    bad = type("Bad", (cps.CPSTrainer,), {attribute: value})
    with pytest.raises(ValueError, match=message):
        unbuilt(dataset_copy, bad)


def test_background_threshold_leaves_unsure_background_out(dataset_copy, in_process_env):
    in_process_env(dataset_copy)
    trainer = unbuilt(dataset_copy, cps.CPSTrainer_bgThreshold)
    k = trainer.ignore_value  # 3 classes: background, 1, 2
    # voxels: background at p 0.95 and at 0.9995, class 1 at p 0.95, background at 0.5 (under 0.9 already)
    p = torch.tensor([[0.95, 0.025, 0.025], [0.9995, 0.00025, 0.00025], [0.025, 0.95, 0.025], [0.5, 0.3, 0.2]])
    logits = torch.log(p).T.reshape(1, 3, 4)
    label, target = trainer.pseudo_target(logits)
    assert label.flatten().tolist() == [0, 0, 1, 0]
    assert target.flatten().tolist() == [k, 0, 1, k]  # 0.95 is enough for class 1, not for background
    trainer.background_threshold = None
    assert trainer.pseudo_target(logits)[1].flatten().tolist() == [0, 0, 1, k]  # the plain threshold 0.9


def test_patches_the_teacher_finds_empty_leave_the_pseudo_label_loss(dataset_copy, in_process_env):
    in_process_env(dataset_copy)
    trainer = unbuilt(dataset_copy, diffcl.DiffCLTrainer_ignoreEmpty)
    k = trainer.ignore_value
    # two patches of 3 voxels: the first has one confident class-1 voxel, the second is confident background only
    p = torch.tensor([[[0.95, 0.03, 0.02], [0.02, 0.95, 0.03], [0.5, 0.3, 0.2]],
                      [[0.95, 0.03, 0.02], [0.99, 0.005, 0.005], [0.97, 0.02, 0.01]]])
    logits = torch.log(p).transpose(1, 2)  # (B, K, voxels)
    label, target = trainer.pseudo_target(logits)
    assert label[:, 0].tolist() == [[0, 1, 0], [0, 0, 0]]
    assert target[:, 0].tolist() == [[0, 1, k], [k, k, k]]  # the empty patch teaches nothing, not background
    # keep= masks on top; with the attribute off the empty patch's confident background counts
    assert trainer.pseudo_target(logits, keep=torch.tensor([[[True, False, True]]] * 2))[1][:, 0].tolist() == [
        [0, k, k], [k, k, k]]
    trainer.ignore_empty_pseudo_labels = False
    assert trainer.pseudo_target(logits)[1][:, 0].tolist() == [[0, 1, k], [0, 0, 0]]


def test_fourier_appearance_without_copy_paste_is_refused(dataset_copy, in_process_env):
    in_process_env(dataset_copy)
    bad = type("Bad", (cps.CPSTrainer_fourierPaste,), {"student_perturbation": "none"})
    with pytest.raises(ValueError, match="pasted_appearance = 'fourier' .* needs student_perturbation = 'copy_paste'"):
        unbuilt(dataset_copy, bad)


@pytest.mark.parametrize("variable, value, message", [
    ("nnUNet_diffcl_pseudo_threshold", "1.2", "nnUNet_diffcl_pseudo_threshold"),
    ("nnUNet_diffcl_warmup_fraction", "0.95", "nnUNet_diffcl_warmup_fraction.* exceeds 1"),
    ("nnUNet_diffcl_rampup_fraction", "-1", "nnUNet_diffcl_rampup_fraction"),
    ("nnUNet_diffcl_warmup_fraction", "half", "nnUNet_diffcl_warmup_fraction must be a number"),
])
def test_bad_dynamics_variables_are_named(dataset_copy, in_process_env, monkeypatch, variable, value, message):
    in_process_env(dataset_copy)
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValueError, match=message):
        unbuilt(dataset_copy, diffcl.DiffCLTrainer)


def test_dynamics_from_environment(dataset_copy, in_process_env, monkeypatch):
    in_process_env(dataset_copy)
    monkeypatch.setenv("nnUNet_diffcl_warmup_fraction", "0.3")
    monkeypatch.setenv("nnUNet_diffcl_pseudo_threshold", "0.7")
    trainer = unbuilt(dataset_copy, cps.CPSTrainer)
    assert (trainer.unsupervised_warmup_fraction, trainer.pseudo_label_threshold) == (0.3, 0.7)
    assert cps.CPSTrainer.unsupervised_warmup_fraction == 0.2  # the class default is untouched


# ------------------------------------------------------------------------------------------ masked loss
def test_masked_pseudo_loss_leaves_masked_voxels_out(dataset_copy, in_process_env):
    """With the mask, the loss over all voxels equals nnU-Net's own loss over the kept voxels alone (Dice and CE
    both sum over voxels, so gathering the kept voxels changes nothing), and masked logits do not matter."""
    in_process_env(dataset_copy)
    trainer = make_trainer(dataset_copy, cps.CPSTrainer)
    masked_loss, plain_loss = trainer.pseudo_loss.loss, trainer.loss.loss  # the losses inside deep supervision
    torch.manual_seed(0)
    logits = torch.randn(1, 2, 4, 4, 4)
    label = torch.randint(0, 2, (1, 1, 4, 4, 4)).to(torch.int16)
    keep = torch.rand(1, 1, 4, 4, 4) > 0.4
    target = masked_pseudo_label(label, keep, trainer.ignore_value)
    assert trainer.ignore_value == 2
    value = masked_loss(logits, target)
    kept = keep[0, 0]
    subset_logits = logits[0][:, kept].reshape(1, 2, -1, 1, 1)
    subset_label = label[0, 0][kept].reshape(1, 1, -1, 1, 1)
    torch.testing.assert_close(value, plain_loss(subset_logits, subset_label))
    changed = logits.clone()
    changed[:, :, ~kept] = 100.0 * torch.randn_like(changed[:, :, ~kept])
    torch.testing.assert_close(masked_loss(changed, target), value)
    # masked voxels are not background: teaching them as background gives another loss
    as_background = masked_pseudo_label(label, keep, 0)
    assert not torch.isclose(plain_loss(logits, as_background), value)


# ------------------------------------------------------------------------------------------ warm-up equivalence
def _primary_grads(trainer, loss: torch.Tensor) -> list[torch.Tensor]:
    trainer.network.zero_grad(set_to_none=True)
    loss.backward()
    return [p.grad.clone() for p in trainer.network.parameters() if p.grad is not None]


@pytest.mark.parametrize("cls", [cps.CPSTrainer, DiffCLTrainer_tiny])
def test_warmup_step_is_the_labeled_only_step(dataset_copy, in_process_env, cls):
    """Weight 0: the primary network's gradient is exactly nnU-Net's labeled-only gradient on the same batch."""
    in_process_env(dataset_copy)
    torch.manual_seed(0)
    trainer = make_trainer(dataset_copy, cls)
    batch = fixed_batch(trainer)
    data, target, data_u = batch["data"], batch["target"], batch[UNLABELED_KEY]["data"]
    total, terms = trainer.compute_losses(data, target, data_u, weight=0.0)
    with_ssl = _primary_grads(trainer, total)
    labeled_only = _primary_grads(trainer, trainer.loss(trainer.network(data), target))
    assert len(with_ssl) == len(labeled_only) > 0
    for a, b in zip(with_ssl, labeled_only):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert all(float(v) == 0.0 for k, v in terms.items() if "pseudo" in k and isinstance(v, torch.Tensor))


# ------------------------------------------------------------------------------------------ DiffCL diagnostics, EMA
def test_diffcl_logs_diagnostics_and_keeps_a_teacher(dataset_copy, in_process_env):
    in_process_env(dataset_copy)
    torch.manual_seed(0)
    trainer = make_trainer(dataset_copy, DiffCLTrainer_tiny)
    assert trainer.ema_sources == {"cs_ema": "cs"}
    assert trainer.teacher("cs") is trainer.auxiliary["cs_ema"].module
    assert not any(p.requires_grad for p in trainer.teacher("cs").parameters())
    batch = fixed_batch(trainer)
    trainer.on_train_epoch_start()
    trainer.ssl_step = 10  # a diagnostics step: DS is sampled on the labeled batch too
    before = [p.clone() for p in trainer.teacher("cs").parameters()]
    out = trainer.train_step(clone(batch))
    assert 0.0 <= out["pseudo_kept"] <= 1.0 and 0.0 <= out["cs_dice_l"] <= 1.0 and 0.0 <= out["ds_dice_l"] <= 1.0
    assert out["ds_cs_dice"] != out["ds_cs_dice"] or 0.0 <= out["ds_cs_dice"] <= 1.0  # NaN when both are empty
    assert {"grad_norm_cs", "grad_norm_ds", "grad_norm_projection_head"} <= set(out)
    assert out["grad_norm_cs"] > 0
    after = list(trainer.teacher("cs").parameters())
    live = list(trainer.network.parameters())
    moved = [b for b, a in zip(before, after) if not torch.equal(a, b)]
    assert moved  # the teacher followed CS's step ...
    for b, a, p in zip(before, after, live):  # ... by exactly the EMA rule
        torch.testing.assert_close(a, trainer.ema_decay * b + (1 - trainer.ema_decay) * p.detach())
    out = trainer.train_step(clone(batch))
    assert math.isnan(out["ds_dice_l"])  # not a diagnostics step

    path = os.path.join(trainer.output_folder, "checkpoint_test.pth")
    trainer.save_checkpoint(path)
    assert "cs_ema" in torch.load(path, weights_only=False)[CHECKPOINT_KEY]["networks"]
    torch.manual_seed(99)
    restored = make_trainer(dataset_copy, DiffCLTrainer_tiny)
    restored.load_checkpoint(path)
    for a, b in zip(trainer.teacher("cs").state_dict().values(), restored.teacher("cs").state_dict().values()):
        assert torch.equal(a, b)
    assert "train_grad_norm_ds" in restored.logger.local_logger.my_fantastic_logging


@pytest.mark.parametrize("cls", [cps.CPSTrainer_original, diffcl.DiffCLTrainer_original,
                                 diffcl.DiffCLTrainer_noAgreement, diffcl.DiffCLTrainer_dsScale01])
def test_dynamics_variants_take_a_step(dataset_copy, in_process_env, cls):
    in_process_env(dataset_copy)
    tiny = type(cls.__name__ + "_tiny", (cls,), {"ddim_steps": 2}) if issubclass(cls, diffcl.DiffCLTrainer) else cls
    trainer = make_trainer(dataset_copy, tiny)
    batch = fixed_batch(trainer)
    trainer.on_train_epoch_start()
    trainer.ssl_step = 3
    out = trainer.train_step(clone(batch))
    assert np.isfinite(out["loss"]) and out["unsupervised_weight"] > 0
    if cls in (cps.CPSTrainer_original, diffcl.DiffCLTrainer_original):
        assert not trainer.ema_sources and trainer.pseudo_loss is trainer.loss
        assert trainer.labeled_appearance == "labeled"  # as first built: the labeled batch as scanned
    if cls is diffcl.DiffCLTrainer_dsScale01:
        assert trainer.diffusion.sampler.signal_scale == 0.1


def test_branch_dice_record_earns_the_veto_per_class():
    from nnunetv2_diffcl.trainers.diffcl import BranchDiceRecord

    record = BranchDiceRecord(3)
    assert record.reliable(0.9).tolist() == [True, False, False]  # unmeasured classes cannot veto
    record.update([0.9, 0.0], [0.95, 0.8])  # DS good at class 1, blind to class 2 (a small lesion)
    assert record.reliable(0.9).tolist() == [True, True, False]
    record.update([float("nan"), 0.8], [0.95, 0.8])  # class 1 absent this time: unchanged
    # running means with momentum 0.9: class 2's DS Dice 0.9 * 0 + 0.1 * 0.8 = 0.08, still far below 0.9 * 0.8
    assert float(record.ds_dice[1]) == pytest.approx(0.9) and float(record.ds_dice[2]) == pytest.approx(0.08)
    assert record.reliable(0.9).tolist() == [True, True, False]


def test_measured_trust_keeps_the_teachers_label_where_ds_has_not_earned_a_veto(dataset_copy, in_process_env):
    in_process_env(dataset_copy)
    torch.manual_seed(0)
    tiny = type("Trust_tiny", (diffcl.DiffCLTrainer_measuredTrust,), {"ddim_steps": 2, "bank_capacity": 64,
                                                                       "unsupervised_warmup_fraction": 0.0})
    trainer = make_trainer(dataset_copy, tiny)
    batch = fixed_batch(trainer)
    data, target, data_u = batch["data"], batch["target"], batch[UNLABELED_KEY]["data"]
    trainer.student_perturbation = "none"  # the student's target is then the pseudo-label itself
    # the teacher says foreground everywhere (confidently), DS says background everywhere (confidently)
    foreground = torch.cat([torch.full_like(data_u[:, :1], -10.0), torch.full_like(data_u[:, :1], 10.0)], 1)
    trainer.ds_pseudo_logits = lambda image, generator=None: -foreground[: image.shape[0]]
    trainer.teacher = lambda name: (lambda x: foreground[: x.shape[0]])
    seen = {}
    loss = trainer.pseudo_loss

    def spy(outputs, targets):
        seen.setdefault("targets", []).append(targets[0] if isinstance(targets, list) else targets)
        return loss(outputs, targets)

    trainer.pseudo_loss = spy
    trainer.ssl_step = 1  # not a diagnostics step: the record changes only as this test says
    trainer.compute_losses(data, target, data_u, weight=1.0)
    cs_target = seen["targets"][0]
    assert bool((cs_target == 1).all())  # DS never measured on class 1: the teacher's label stands
    trainer.auxiliary["ds_trust"].module.update([1.0], [1.0])  # now DS has earned class 1
    seen.clear()
    trainer.compute_losses(data, target, data_u, weight=1.0)
    assert bool((seen["targets"][0] == trainer.ignore_value).all())  # its disagreement masks the voxels


def test_class_dice_known_values():
    from nnunetv2_diffcl.losses.pseudo_labels import class_dice

    scores = class_dice(torch.tensor([0, 1, 1, 2]), torch.tensor([0, 1, 0, 0]), 4)
    assert scores[:2] == pytest.approx([2 / 3, 0.0]) and math.isnan(scores[2])  # class 3 absent from both
