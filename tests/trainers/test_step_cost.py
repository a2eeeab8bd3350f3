"""The settings that cut DiffCLTrainer's step: head on sampled voxels, DS width, DS on labeled data only, the
unlabeled batch ratio, the share of it learnt from, DDIM steps and the in-training Dice-versus-S diagnostics; their
bad values."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nnunetv2_diffcl.trainers import cps, diffcl, labeled_only
from nnunetv2_diffcl.unlabeled.perturbations import amplitude_mix
from nnunetv2_diffcl.unlabeled.semi_supervised_loader import UNLABELED_KEY
from tests.trainers.test_cps_trainer import clone, make_trainer
from tests.trainers.test_diffcl_trainer import DiffCLTrainer_tiny, fixed_batch
from tests.trainers.test_dynamics import unbuilt


def variant(**attributes) -> type:
    return type("DiffCLTrainer_tinyVariant", (DiffCLTrainer_tiny,), attributes)


def test_head_on_sampled_voxels_gives_the_full_heads_loss(dataset_copy, in_process_env):
    in_process_env(dataset_copy)
    torch.manual_seed(0)
    trainer = make_trainer(dataset_copy, DiffCLTrainer_tiny)
    n, spatial = 2, (8, 8, 8)
    features = torch.randn(2 * n, trainer.auxiliary["projection_head"].module.net[0].in_channels, *spatial)
    target = torch.randint(0, 3, (n, 1, *spatial))
    logits = torch.randn(n, 3, *spatial)
    query = torch.randint(0, 4, (n, 1, *spatial))  # 3 = the ignore value (left out)
    bank = trainer.auxiliary["memory_bank"].module
    bank.push(torch.nn.functional.normalize(torch.randn(60, trainer.embed_dim), dim=1), torch.arange(60) % 3)
    state = {k: v.clone() for k, v in bank.state_dict().items()}
    results = {}
    for sampled in (False, True):
        bank.load_state_dict(state)
        trainer.head_on_sampled_voxels = sampled
        torch.manual_seed(7)
        loss, floor = trainer.contrastive_loss(features[:n], features[n:], target, logits, query)
        results[sampled] = (loss, floor, bank.features.clone(), bank.count.clone())
    torch.testing.assert_close(results[True][0], results[False][0])
    assert results[True][0] > 0 and results[True][1] == results[False][1]
    torch.testing.assert_close(results[True][2], results[False][2])  # the bank got the same new entries
    assert torch.equal(results[True][3], results[False][3])


def test_ds_on_labeled_data_only(dataset_copy, in_process_env):
    in_process_env(dataset_copy)
    torch.manual_seed(0)
    trainer = make_trainer(dataset_copy, variant(ds_on_unlabeled=False))
    batch = fixed_batch(trainer)
    data, target, data_u = batch["data"], batch["target"], batch[UNLABELED_KEY]["data"]
    seen = []
    forward = trainer.ds_train_forward
    trainer.ds_train_forward = lambda images, labels: seen.append(images.shape[0]) or forward(images, labels)
    total, terms = trainer.compute_losses(data, target, data_u, weight=1.0)
    assert seen == [data.shape[0]]  # DS learnt from the labeled batch alone
    assert float(terms["ds_pseudo"]) == 0.0 and torch.isfinite(total)
    total.backward()
    assert all(p.grad is not None for n, p in trainer.auxiliary["ds"].module.named_parameters()
               if "seg_layers.0" not in n)


def test_narrow_ds_and_diagnostic_ddim_steps(dataset_copy, in_process_env):
    in_process_env(dataset_copy)
    torch.manual_seed(0)
    trainer = make_trainer(dataset_copy, variant(ds_width_fraction=0.5, diagnostic_ddim_steps=(1, 3)))
    planned = trainer.configuration_manager.network_arch_init_kwargs["features_per_stage"]
    assert list(trainer.auxiliary["ds"].module.encoder.output_channels) == [round(f / 2) for f in planned]
    batch = fixed_batch(trainer)
    trainer.on_train_epoch_start()
    trainer.ssl_step = 0  # a diagnostics step: DS's Dice is sampled at S = 2 (the default here), 1 and 3
    out = trainer.train_step(clone(batch))
    assert all(0.0 <= out[k] <= 1.0 for k in ("ds_dice_l", "ds_dice_l_S1", "ds_dice_l_S3"))
    out = trainer.train_step(clone(batch))  # not a diagnostics step
    assert np.isnan(out["ds_dice_l_S1"]) and np.isfinite(out["loss"])
    assert "ds_dice_l_S3" in trainer.logged_terms


def test_ds_pseudo_label_is_reused_for_k_steps_and_sampled_again_after(dataset_copy, in_process_env):
    in_process_env(dataset_copy)
    torch.manual_seed(0)
    trainer = make_trainer(dataset_copy, variant(ds_refresh_every=3))
    batch = fixed_batch(trainer)
    sampled = []
    sample = trainer.ds_pseudo_logits
    trainer.ds_pseudo_logits = lambda image, generator=None: sampled.append(image) or sample(image, generator)
    patches = [torch.randn_like(batch[UNLABELED_KEY]["data"]) for _ in range(7)]
    served = [trainer.refreshed_ds_logits(p) for p in patches]
    assert [any(p is s for s in sampled) for p in patches] == [True, False, False, True, False, False, True]
    for i, (data_u, logits, teacher) in enumerate(served):
        first = i - i % 3  # the step that sampled the label this step reuses
        assert data_u is patches[first] and logits is served[first][1] and teacher is served[first][2]
        assert logits.shape[0] == data_u.shape[0] and not logits.requires_grad
    # in training: the step after a sampling step learns from the same unlabeled patch and samples nothing
    trainer.on_train_epoch_start()
    trainer.ssl_step = 10 ** 6 + 1  # past the warm-up, not a diagnostics step
    trainer._ds_pseudo_cache, sampled[:] = None, []
    for _ in range(4):
        other = clone(batch)
        other[UNLABELED_KEY]["data"] = torch.randn_like(batch[UNLABELED_KEY]["data"])
        assert np.isfinite(trainer.train_step(other)["loss"])
        trainer.ssl_step += trainer.ssl_step % trainer.diagnostics_every == 0
    assert len(sampled) == 2



@pytest.mark.parametrize("on_unlabeled", [False, True])
def test_ds_learns_on_one_step_in_k(dataset_copy, in_process_env, on_unlabeled):
    """ds_train_every = 2: after the warm-up DS runs, gets a gradient and moves on even steps only; CS learns on every
    step."""
    in_process_env(dataset_copy)
    torch.manual_seed(0)
    trainer = make_trainer(dataset_copy, variant(ds_train_every=2, ds_on_unlabeled=on_unlabeled,
                                                 diagnostics_every=1000))
    batch = fixed_batch(trainer)
    ds, cs = trainer.auxiliary["ds"].module, trainer.network
    calls = []
    forward = trainer.ds_train_forward
    trainer.ds_train_forward = lambda images, labels: calls.append(trainer.ssl_step) or forward(images, labels)
    trainer.on_train_epoch_start()
    trainer.ssl_step = 10 ** 6 + 1  # past the warm-up, no diagnostics step among the four
    for _ in range(4):
        step = trainer.ssl_step
        ds_before = [p.detach().clone() for p in ds.parameters()]
        cs_before = [p.detach().clone() for p in cs.parameters()]
        out = trainer.train_step(clone(batch))
        ds_moved = any(not torch.equal(a, p) for a, p in zip(ds_before, ds.parameters()))
        assert ds_moved == (step % 2 == 0) == np.isfinite(out["grad_norm_ds"]) == np.isfinite(out["ds_sup"])
        assert any(not torch.equal(a, p) for a, p in zip(cs_before, cs.parameters()))
        assert np.isfinite(out["loss"]) and np.isfinite(out["grad_norm_cs"])
    assert calls == [10 ** 6 + 2, 10 ** 6 + 4]
    # in the warm-up DS learns on every step
    trainer.ssl_step = 1
    _, terms = trainer.compute_losses(batch["data"], batch["target"], batch[UNLABELED_KEY]["data"], weight=0.0)
    assert np.isfinite(float(terms["ds_sup"])) and calls[-1] == 1

def post_warmup_steps(trainer, batch: dict, steps: int, after_step=None) -> tuple[list, list]:
    """``steps`` training steps past the warm-up (none a diagnostics step), each on new random unlabeled patches:
    the teacher's inputs and the unlabeled batches, in order; ``after_step(trainer)`` runs after each step."""
    calls, seen = [], []
    teacher = trainer.teacher_logits
    trainer.teacher_logits = lambda data_u: calls.append(data_u) or teacher(data_u)
    trainer.on_train_epoch_start()
    trainer.ssl_step = 10 ** 6 + 1
    for _ in range(steps):
        other = clone(batch)
        other[UNLABELED_KEY]["data"] = torch.randn_like(batch[UNLABELED_KEY]["data"])
        seen.append(other[UNLABELED_KEY]["data"])
        assert np.isfinite(trainer.train_step(other)["loss"])
        if after_step is not None:
            after_step(trainer)
        trainer.ssl_step += trainer.ssl_step % trainer.diagnostics_every == 0
    return calls, seen


@pytest.mark.parametrize("cached", [False, True])
def test_teacher_logits_are_cached_with_ds_for_k_steps_when_asked(dataset_copy, in_process_env, cached):
    in_process_env(dataset_copy)
    torch.manual_seed(0)
    trainer = make_trainer(dataset_copy, variant(ds_refresh_every=3, teacher_refresh_with_ds=cached))
    served = []
    calls, _ = post_warmup_steps(trainer, fixed_batch(trainer), 6,
                                 lambda t: served.append(t._ds_pseudo_cache.teacher_logits))
    # cached: the teacher runs when DS samples (steps 1 and 4) and its logits serve the two steps after; else: on
    # every step, and nothing of the teacher's is cached
    assert len(calls) == (2 if cached else 6)
    if cached:
        assert served[0] is served[1] is served[2] and served[3] is served[4] is served[5]
        assert served[0] is not served[3] and not served[0].requires_grad
        assert calls[1] is trainer._ds_pseudo_cache.data_u  # the teacher labelled the patches DS labelled
    else:
        assert all(s is None for s in served)


def test_pseudo_label_pool_draws_ds_batch_from_the_last_steps(dataset_copy, in_process_env):
    """With a pool of 2, DS's batch is drawn from the two last steps' patches, which the teacher labels once."""
    in_process_env(dataset_copy)
    torch.manual_seed(0)
    trainer = make_trainer(dataset_copy, variant(ds_refresh_every=2, pseudo_label_pool=2))
    calls, seen = post_warmup_steps(trainer, fixed_batch(trainer), 3)
    # step 1 samples its own batch (no pool yet); step 3 draws from steps 2 and 3
    assert [c.shape[0] for c in calls] == [2, 4]
    pool = torch.cat(seen[1:])
    drawn = trainer._ds_pseudo_cache.data_u
    assert drawn.shape[0] == 2
    assert all(any(torch.equal(patch, p) for p in pool) for patch in drawn)
    assert not torch.equal(drawn[0], drawn[1])


@pytest.mark.parametrize("cls", [cps.CPSTrainer, DiffCLTrainer_tiny])
def test_unlabeled_batch_ratio(dataset_copy, in_process_env, cls):
    in_process_env(dataset_copy)
    torch.manual_seed(0)
    trainer = make_trainer(dataset_copy, type("Half", (cls,), {"unlabeled_batch_ratio": 0.5}))
    batch = fixed_batch(trainer)
    assert trainer.batch_size == 2 and trainer.unlabeled_batch_size == 1
    assert batch[UNLABELED_KEY]["data"].shape[0] == 1 and batch["data"].shape[0] == 2
    trainer.on_train_epoch_start()
    trainer.ssl_step = 10 ** 6  # past the warm-up: copy-paste and the unlabeled terms run
    assert np.isfinite(trainer.train_step(clone(batch))["loss"])


@pytest.mark.parametrize("cls", [cps.CPSTrainer, DiffCLTrainer_tiny])
def test_pseudo_label_batch_ratio_keeps_every_look(dataset_copy, in_process_env, cls):
    """The students learn from the first patch of two, while both give the labeled batch its looks."""
    in_process_env(dataset_copy)
    torch.manual_seed(0)
    trainer = make_trainer(dataset_copy, type("PseudoHalf", (cls,), {"pseudo_label_batch_ratio": 0.5}))
    batch = fixed_batch(trainer)
    assert trainer.unlabeled_batch_size == 2 and trainer.pseudo_label_batch_size == 1
    looks, learnt = [], []
    labeled_input, compute_losses = trainer.labeled_input, trainer.compute_losses
    trainer.labeled_input = lambda data, data_u, weight: looks.append(data_u) or labeled_input(data, data_u, weight)
    trainer.compute_losses = lambda data, target, data_u, weight: (learnt.append(data_u)
                                                                   or compute_losses(data, target, data_u, weight))
    trainer.on_train_epoch_start()
    trainer.ssl_step = 10 ** 6  # past the warm-up: the restyle and the unlabeled terms run
    assert np.isfinite(trainer.train_step(clone(batch))["loss"])
    unlabeled = batch[UNLABELED_KEY]["data"]
    assert torch.equal(looks[0].cpu(), unlabeled)
    assert torch.equal(learnt[0].cpu(), unlabeled[:1])
    if cls is DiffCLTrainer_tiny:  # DS labelled that one patch
        assert trainer._ds_pseudo_cache.data_u.shape[0] == 1


@pytest.mark.parametrize("cls, attribute, value, message", [
    (diffcl.DiffCLTrainer, "ds_width_fraction", 0.0, r"ds_width_fraction must lie in \(0, 1\]"),
    (diffcl.DiffCLTrainer, "ds_width_fraction", 1.5, r"ds_width_fraction must lie in \(0, 1\]"),
    (diffcl.DiffCLTrainer, "ddim_steps", 0, r"ddim_steps \(0\) and diagnostic_ddim_steps .* \[1, "),
    (diffcl.DiffCLTrainer, "diagnostic_ddim_steps", (2, 5000), r"\(\(2, 5000\); nnUNet_diffcl_diagnostic_ddim_steps\)"),
    (cps.CPSTrainer, "unlabeled_batch_ratio", 0.0, "unlabeled_batch_ratio must be > 0"),
    (cps.CPSTrainer, "pseudo_label_batch_ratio", 0.0, r"pseudo_label_batch_ratio must lie in \(0, 1\]"),
    (diffcl.DiffCLTrainer, "pseudo_label_batch_ratio", 1.5, r"pseudo_label_batch_ratio must lie in \(0, 1\]"),
    (diffcl.DiffCLTrainer, "ds_refresh_every", 0, "ds_refresh_every must be a whole number >= 1"),
    (diffcl.DiffCLTrainer, "ds_refresh_every", 2.5, "ds_refresh_every must be a whole number >= 1"),
    (diffcl.DiffCLTrainer, "teacher_refresh_with_ds", "yes", "teacher_refresh_with_ds must be True or False"),
    (diffcl.DiffCLTrainer, "pseudo_label_pool", 5, r"pseudo_label_pool must be a whole number in \[1, "),
    (diffcl.DiffCLTrainer, "pseudo_label_pool", 0, r"pseudo_label_pool must be a whole number in \[1, "),
    (diffcl.DiffCLTrainer, "ds_train_every", 0, "ds_train_every must be a whole number >= 1"),
    (diffcl.DiffCLTrainer, "ds_train_every", 1.5, "ds_train_every must be a whole number >= 1"),
])
def test_bad_cost_settings_are_refused(dataset_copy, in_process_env, cls, attribute, value, message):
    in_process_env(dataset_copy)
    with pytest.raises(ValueError, match=message):
        unbuilt(dataset_copy, type("Bad", (cls,), {attribute: value}))


def test_diagnostic_ddim_steps_from_the_environment(dataset_copy, in_process_env, monkeypatch):
    in_process_env(dataset_copy)
    monkeypatch.setenv("nnUNet_diffcl_diagnostic_ddim_steps", "1, 3,10")
    assert unbuilt(dataset_copy, diffcl.DiffCLTrainer).diagnostic_ddim_steps == (1, 3, 10)
    assert diffcl.DiffCLTrainer.diagnostic_ddim_steps == ()
    monkeypatch.setenv("nnUNet_diffcl_diagnostic_ddim_steps", "1;3")
    with pytest.raises(ValueError, match="nnUNet_diffcl_diagnostic_ddim_steps must be comma-separated"):
        unbuilt(dataset_copy, diffcl.DiffCLTrainer)


def test_a_checkpoint_of_another_ds_width_is_refused_with_the_fix(dataset_copy, in_process_env):
    import os

    from nnunetv2_diffcl.trainers.diffcl import checkpoint_ds_width

    in_process_env(dataset_copy)
    trainer = make_trainer(dataset_copy, DiffCLTrainer_tiny)
    path = os.path.join(trainer.output_folder, "checkpoint_width.pth")
    trainer.save_checkpoint(path)
    state = torch.load(path, weights_only=False)["semi_supervised"]
    assert checkpoint_ds_width(state) == 0.5 and checkpoint_ds_width({"extra": {}}) == 1.0  # old: full width
    wide = make_trainer(dataset_copy, variant(ds_width_fraction=1.0))
    with pytest.raises(RuntimeError, match="width fraction 0.5.*resume with a trainer of DS width 0.5"):
        wide.load_checkpoint(path)
    make_trainer(dataset_copy, DiffCLTrainer_tiny).load_checkpoint(path)  # the same width loads


def test_schedule_variants_shorten_nnunets_epochs_and_the_variables_still_win(dataset_copy, in_process_env,
                                                                             monkeypatch):
    in_process_env(dataset_copy)
    monkeypatch.delenv("nnUNet_diffcl_epochs")
    assert unbuilt(dataset_copy, diffcl.DiffCLTrainer_250epochs).num_epochs == 250
    assert unbuilt(dataset_copy, diffcl.DiffCLTrainer_100epochs).num_epochs == 100
    assert unbuilt(dataset_copy, cps.CPSTrainer_250epochs).num_epochs == 250
    assert unbuilt(dataset_copy, diffcl.DiffCLTrainer).num_epochs == 1000  # nnU-Net's
    monkeypatch.setenv("nnUNet_diffcl_epochs", "3")
    assert unbuilt(dataset_copy, diffcl.DiffCLTrainer_250epochs).num_epochs == 3


@pytest.mark.parametrize("cls", [cps.CPSTrainer_strongIntensity, diffcl.DiffCLTrainer_strongIntensity,
                                 diffcl.DiffCLTrainer_studentClutter])
def test_student_appearance_changes_the_students_patch_not_its_labels(dataset_copy, in_process_env, cls):
    in_process_env(dataset_copy)
    torch.manual_seed(0)
    tiny = type("Tiny", (cls,), {"ddim_steps": 2, "student_perturbation": "none"})
    trainer = make_trainer(dataset_copy, tiny)
    batch = fixed_batch(trainer)
    data, data_u = batch["data"], batch[UNLABELED_KEY]["data"]
    label = torch.randint(0, 3, data_u[:, :1].shape)
    student, (target,) = trainer.student_input(data, batch["target"][0], data_u, [label])
    assert student.shape == data_u.shape and not torch.allclose(student, data_u)
    assert torch.equal(target, label)  # geometry untouched: the teacher's labels still fit voxel for voxel
    trainer.on_train_epoch_start()
    trainer.ssl_step = 10 ** 6
    assert np.isfinite(trainer.train_step(clone(batch))["loss"])


def test_student_appearance_is_another_unlabeled_patchs(dataset_copy, in_process_env):
    """At mixing weight 1 the Fourier restyle gives student patch i the amplitude spectrum of unlabeled patch i - 1
    (its phase stays, so the teacher's label of patch i still fits)."""
    in_process_env(dataset_copy)
    tiny = type("Tiny", (diffcl.DiffCLTrainer,), {"ddim_steps": 2, "student_perturbation": "none",
                                                  "student_appearance": "fourier", "appearance_mix_range": (1.0, 1.0)})
    trainer = make_trainer(dataset_copy, tiny)
    batch = fixed_batch(trainer)
    data, data_u = batch["data"], batch[UNLABELED_KEY]["data"]
    assert data_u.shape[0] >= 2
    student, _ = trainer.student_input(data, batch["target"][0], data_u, [torch.zeros_like(data_u[:, :1])])
    dims = tuple(range(2, student.ndim))
    got, own, other = (torch.fft.fftn(x.double(), dim=dims) for x in (student, data_u, data_u.roll(1, 0)))
    assert torch.allclose(got.abs(), other.abs(), atol=1e-3)
    defined = (own.abs() > 1e-3) & (other.abs() > 1e-3)  # where both phases are defined
    assert torch.allclose(torch.cos(got.angle() - own.angle())[defined], torch.ones(1, dtype=torch.float64),
                          atol=1e-3)


def test_ds_is_compiled_where_nnunet_would_compile(dataset_copy, in_process_env, monkeypatch):
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    in_process_env(dataset_copy)
    monkeypatch.setattr(nnUNetTrainer, "_do_i_compile", lambda self: True)  # as on a CUDA machine
    trainer = make_trainer(dataset_copy, DiffCLTrainer_tiny)
    ds = trainer.auxiliary["ds"].module
    assert hasattr(ds, "_orig_mod") and trainer.diffusion.denoiser is ds
    assert not hasattr(trainer.network, "_orig_mod")  # CS keeps HFMambaTrainer's rule: never compiled
    # the checkpoint holds the plain module's keys, as before
    assert trainer._bare(ds) is ds._orig_mod
    assert not any(k.startswith("_orig_mod") for k in trainer._bare(ds).state_dict())


@pytest.mark.parametrize("cls", [cps.CPSTrainer_fourierPaste, diffcl.DiffCLTrainer_fourierPaste,
                                 cps.CPSTrainer_histogramPaste, diffcl.DiffCLTrainer_styledPaste])
def test_styled_paste_restyles_only_the_pasted_box_and_keeps_its_ground_truth(dataset_copy, in_process_env, cls):
    in_process_env(dataset_copy)
    torch.manual_seed(0)
    trainer = make_trainer(dataset_copy, type("Tiny", (cls,), {"ddim_steps": 2}))
    batch = fixed_batch(trainer)
    data, data_u, target_full = batch["data"], batch[UNLABELED_KEY]["data"], batch["target"][0]
    label = torch.full_like(data_u[:, :1], 7.0)  # a pseudo-label no ground truth holds
    torch.manual_seed(1)
    student, (target,) = trainer.student_input(data, target_full, data_u, [label])
    box = target != 7.0
    assert box.any() and (~box).any()
    outside = ~box.expand_as(student)
    assert torch.equal(student[outside], data_u[outside])  # the unlabeled patch is untouched outside the box
    source = torch.arange(data_u.shape[0]) % data.shape[0]
    assert torch.equal(target[box], target_full[source][box].to(target.dtype))  # ground truth inside the box
    # inside, the pasted labeled voxels are restyled (a plain copy-paste would equal them)
    assert not torch.allclose(student[box.expand_as(student)], data[source][box.expand_as(student)])
    trainer.on_train_epoch_start()
    trainer.ssl_step = 10 ** 6
    assert np.isfinite(trainer.train_step(clone(batch))["loss"])


@pytest.mark.parametrize("cls", [cps.CPSTrainer_fourierRestyle, diffcl.DiffCLTrainer_fourierRestyle,
                                 labeled_only.LabeledOnlyTrainer_fourierLabeled])
def test_fourier_labeled_restyles_the_labeled_batch_by_the_unsupervised_weight(dataset_copy, in_process_env, cls):
    in_process_env(dataset_copy)
    torch.manual_seed(0)
    tiny = type("Tiny", (cls,), {"ddim_steps": 2, "appearance_mix_range": (1.0, 1.0)})
    trainer = make_trainer(dataset_copy, tiny)
    batch = fixed_batch(trainer)
    data, data_u = batch["data"], batch[UNLABELED_KEY]["data"]
    assert trainer.labeled_input(data, data_u, 0.0) is data  # warm-up: nnU-Net's labeled batch itself
    dims = tuple(range(2, data.ndim))
    amplitude = lambda x: torch.fft.rfftn(x.float(), dim=dims).abs()  # noqa: E731
    source = torch.arange(data.shape[0]) % data_u.shape[0]
    for weight in (0.5, 1.0):  # mixing weight = range (1, 1) x unsupervised weight: a known amplitude
        restyled = trainer.labeled_input(data, data_u, weight)
        assert restyled.shape == data.shape and restyled.dtype == data.dtype
        expected = (1 - weight) * amplitude(data) + weight * amplitude(data_u[source])
        torch.testing.assert_close(amplitude(restyled), expected, rtol=1e-3, atol=1e-3)
    trainer.on_train_epoch_start()
    trainer.ssl_step = 10 ** 6
    seen = []
    compute = trainer.compute_losses
    trainer.compute_losses = lambda d, *a: seen.append(d) or compute(d, *a)
    out = trainer.train_step(clone(batch))
    assert np.isfinite(out["loss"]) and not torch.equal(seen[0], data)  # the step trained on the restyled batch


@pytest.mark.parametrize("cls", [labeled_only.LabeledOnlyTrainer_clutterRestyle, diffcl.DiffCLTrainer, cps.CPSTrainer])
def test_clutter_labeled_adds_a_zero_mean_field_to_the_fourier_restyle(dataset_copy, in_process_env, cls):
    in_process_env(dataset_copy)
    torch.manual_seed(0)
    tiny = type("Tiny", (cls,), {"ddim_steps": 2, "appearance_mix_range": (1.0, 1.0)})
    trainer = make_trainer(dataset_copy, tiny)
    batch = fixed_batch(trainer)
    data, data_u = batch["data"], batch[UNLABELED_KEY]["data"]
    source = torch.arange(data.shape[0]) % data_u.shape[0]
    swapped = amplitude_mix(data, data_u[source], torch.ones(data.shape[0]))
    restyled = trainer.labeled_input(data, data_u, 1.0)
    # weight 1: (amplitude-swapped patch + field) / sqrt(2), the field with mean 0 and the style's power
    dims = tuple(range(1, data.ndim))
    torch.testing.assert_close(restyled.mean(dim=dims), swapped.mean(dim=dims) / 2 ** 0.5, atol=1e-4, rtol=0)
    assert not torch.allclose(restyled, swapped / 2 ** 0.5, atol=1e-3)  # the field is there


def test_bias_field_reaches_the_labeled_batch_after_the_warm_up_only(dataset_copy, in_process_env):
    in_process_env(dataset_copy)
    torch.manual_seed(0)
    tiny = type("Tiny", (labeled_only.LabeledOnlyTrainer_biasField,), {"labeled_appearance": "labeled"})
    trainer = make_trainer(dataset_copy, tiny)
    batch = fixed_batch(trainer)
    data, data_u = batch["data"], batch[UNLABELED_KEY]["data"]
    assert trainer.labeled_input(data, data_u, 0.0) is data  # warm-up: nnU-Net's labeled batch itself
    biased = trainer.labeled_input(data, data_u, 1.0)
    dims = tuple(range(1, data.ndim))
    assert biased.shape == data.shape and not torch.allclose(biased, data, atol=1e-3)
    torch.testing.assert_close(biased.mean(dim=dims), data.mean(dim=dims), atol=1e-4, rtol=0)
    trainer.labeled_bias_field = 0.0
    assert trainer.labeled_input(data, data_u, 1.0) is data


def test_student_bias_field_changes_the_students_patch_only(dataset_copy, in_process_env):
    in_process_env(dataset_copy)
    torch.manual_seed(0)
    tiny = type("Tiny", (diffcl.DiffCLTrainer,), {"ddim_steps": 1, "student_perturbation": "none",
                                                  "student_bias_field": 1.0})
    trainer = make_trainer(dataset_copy, tiny)
    assert not trainer.student_sees_teacher_input  # so the teacher gets its own forward pass of the plain patch
    batch = fixed_batch(trainer)
    data, data_u = batch["data"], batch[UNLABELED_KEY]["data"]
    target = torch.zeros_like(data_u[:, :1])
    student, (kept,) = trainer.student_input(data, target, data_u, [target])
    dims = tuple(range(1, data_u.ndim))
    assert not torch.allclose(student, data_u, atol=1e-3) and kept is target
    torch.testing.assert_close(student.mean(dim=dims), data_u.mean(dim=dims), atol=1e-4, rtol=0)
    trainer.on_train_epoch_start()
    trainer.ssl_step = 10 ** 6
    assert np.isfinite(trainer.train_step(clone(batch))["loss"])
