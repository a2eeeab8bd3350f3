"""The one place for "labeled batch + unlabeled batch -> losses -> optimiser steps".

:class:`SemiSupervisedTrainer` is nnU-Net's trainer with

- a training loader that yields an unlabeled batch beside each labeled one (unlabeled/semi_supervised_loader);
- auxiliary networks with their own optimiser and learning-rate schedule (CPS's second network,
  Diff-CL's diffusion branch, ...), trained in the same step, saved in and restored from checkpoints;
- the training dynamics that decide when and how much the unsupervised terms count: a supervised
  warm-up (weight exactly 0 for the first ``unsupervised_warmup_fraction`` of the iterations), then a
  sigmoid ramp over the next ``unsupervised_rampup_fraction``; a confidence threshold for pseudo-labels
  (``pseudo_label_threshold``; voxels under it leave the loss, through nnU-Net's ignore-label mechanism);
  a stronger perturbation of the student's unlabeled input (``student_perturbation``); EMA teachers;
- per-term logging (log file and progress.png), each trained network's gradient norm before clipping,
  and a step that is skipped, with a warning, when the loss is not finite.

Subclasses define ``loss_terms``, ``build_auxiliary_networks`` and ``compute_losses``. nnU-Net's
``run_training`` loop, validation, checkpoint names and prediction stay as they are: ``self.network``
is the network nnU-Net saves as ``network_weights`` and ``nnUNetv2_predict`` uses.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from os.path import join
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from nnunetv2.paths import nnUNet_raw
from nnunetv2.utilities.collate_outputs import collate_outputs
from nnunetv2.utilities.helpers import dummy_context
from torch import autocast, nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.optim.swa_utils import get_ema_multi_avg_fn

from nnunetv2_diffcl.losses.pseudo_labels import (
    copy_paste,
    label_and_confidence,
    masked_pseudo_label,
    random_boxes,
)
from nnunetv2_diffcl.self_training import ground_truth_weighted, pseudo_labelled_cases
from nnunetv2_diffcl.trainers.schedule import ScheduleFromEnvironment, override_from_environment
from nnunetv2_diffcl.trainers.term_logger import TERM_PREFIX, TermLogger
from nnunetv2_diffcl.unlabeled.perturbations import bias_field, intensity_perturbation, restyle, uniform_draws
from nnunetv2_diffcl.unlabeled.preprocessing import check_unlabeled_data, unlabeled_folder
from nnunetv2_diffcl.unlabeled.semi_supervised_loader import (
    UNLABELED_KEY,
    SemiSupervisedBatches,
    augmenter_for,
    data_loader_of,
    unlabeled_loader_like,
)

CHECKPOINT_KEY = "semi_supervised"
WEIGHT_TERM = "unsupervised_weight"


PERTURBATIONS = ("none", "copy_paste")
# how the box pasted from the labeled patch (pasted_appearance) or the labeled batch (labeled_appearance) looks: as
# scanned, or restyled by an unlabeled patch (its Fourier amplitude, its intensity histogram, the amplitude first
# and then the histogram, or the amplitude plus a random-phase field of the same power spectrum)
RESTYLES = ("fourier", "histogram", "fourier_histogram", "fourier_clutter")
PASTED_APPEARANCES = ("labeled",) + RESTYLES
# the student's unlabeled patch: as scanned, or restyled by another unlabeled patch of the step
STUDENT_APPEARANCES = ("unlabeled",) + RESTYLES
# the dynamics an nnUNet_diffcl_* variable may override for one run (a number each)
DYNAMICS_VARIABLES = {"unsupervised_warmup_fraction": "nnUNet_diffcl_warmup_fraction",
                      "unsupervised_rampup_fraction": "nnUNet_diffcl_rampup_fraction",
                      "pseudo_label_threshold": "nnUNet_diffcl_pseudo_threshold"}


def sigmoid_rampup(progress: float) -> float:
    """exp(-5 (1 - x)^2) for x = progress clipped to [0, 1] (Laine & Aila, 2017): 0.0067 -> 1."""
    x = min(max(progress, 0.0), 1.0)
    return float(math.exp(-5.0 * (1.0 - x) ** 2))


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """Mean teacher (Tarvainen & Valpola, 2017): ema <- decay * ema + (1 - decay) * model, buffers copied. torch's
    own multi-tensor EMA: one batched update instead of one per parameter (a tenth of a step's overhead, less)."""
    get_ema_multi_avg_fn(decay)(list(ema.parameters()), [m.detach() for m in model.parameters()], None)
    for e, m in zip(ema.buffers(), model.buffers()):
        e.copy_(m)


class _WithIgnoreLabel:
    """A label manager that reports ``ignore_label``: lets nnU-Net's own ``_build_loss`` build the masked
    pseudo-label loss (same Dice + CE, same deep-supervision weights, ignored voxels left out)."""

    def __init__(self, label_manager: Any, ignore_label: int) -> None:
        self._label_manager = label_manager
        self.ignore_label = ignore_label
        self.has_ignore_label = True

    def __getattr__(self, name: str) -> Any:
        return getattr(self._label_manager, name)


def labeled_class_shares(dataset: Any, num_classes: int) -> torch.Tensor:
    """Each class's share of the labeled cases' voxels (K,), from their preprocessed segmentations (voxels outside
    the labels' range, e.g. nnU-Net's -1 outside the nonzero mask, are not counted)."""
    counts = np.zeros(num_classes, dtype=np.float64)
    for identifier in dataset.identifiers:
        seg = np.asarray(dataset.load_case(identifier)[1])
        counts += np.bincount(seg[(seg >= 0) & (seg < num_classes)].astype(np.int64).ravel(), minlength=num_classes)
    if counts.sum() == 0:
        raise RuntimeError("distribution alignment needs labeled voxels, but the labeled cases' segmentations are "
                           "empty")
    return torch.from_numpy(counts / counts.sum()).float()


class ClassShares(nn.Module):
    """The labeled cases' class shares and a running mean of each teacher's predicted shares on unlabeled patches,
    as buffers: saved in the checkpoint with the auxiliary networks and restored by ``--c``. Under DDP each rank
    keeps the running shares of its own unlabeled batches (rank 0's are saved)."""

    def __init__(self, num_classes: int, teachers: list[str], momentum: float) -> None:
        super().__init__()
        self.teachers = list(teachers)
        self.momentum = momentum
        self.register_buffer("labeled", torch.full((num_classes,), 1.0 / num_classes))
        self.register_buffer("running", torch.full((len(teachers), num_classes), 1.0 / num_classes))
        self.register_buffer("started", torch.zeros(len(teachers), dtype=torch.bool))

    def set_labeled(self, shares: torch.Tensor) -> None:
        self.labeled.copy_(shares.to(self.labeled))

    @torch.no_grad()
    def update(self, teacher: str, shares: torch.Tensor) -> torch.Tensor:
        """Fold one batch's predicted shares into ``teacher``'s running mean (its first batch sets it); returns it."""
        i = self.teachers.index(teacher)
        if self.started[i]:
            self.running[i] = self.momentum * self.running[i] + (1 - self.momentum) * shares.to(self.running)
        else:
            self.running[i], self.started[i] = shares.to(self.running), True
        return self.running[i]


@dataclass
class AuxiliaryNetwork:
    """A network trained beside ``self.network``; optimiser and schedule may be None (not trained)."""

    module: nn.Module
    optimizer: torch.optim.Optimizer | None = None
    lr_scheduler: Any = None


class SemiSupervisedTrainer(ScheduleFromEnvironment):
    """Base class of the plugin's semi-supervised trainers (not a trainer by itself).

    Training dynamics, as class attributes (a variant changes them in a subclass; the ``nnUNet_diffcl_*``
    variables in brackets override them for one run):

    - ``unsupervised_warmup_fraction`` (``_warmup_fraction``): share of the iterations with unsupervised weight
      exactly 0; the step then is the labeled-only step (the unlabeled batch is not even forwarded);
    - ``unsupervised_rampup_fraction`` (``_rampup_fraction``): share of the iterations, after the warm-up, over
      which the weight rises along a sigmoid to 1;
    - ``pseudo_label_threshold`` (``_pseudo_threshold``): teacher probability under which a voxel leaves the
      pseudo-label loss; None keeps every voxel;
    - ``student_perturbation``: ``"copy_paste"`` pastes a box of the labeled patch (with its ground truth)
      into the student's unlabeled patch, the teacher sees the patch as it is; ``"none"`` gives both the same;
    - ``pasted_appearance``: ``"fourier"`` gives the pasted labeled box the Fourier amplitude of the unlabeled
      patch it lands in (phase kept), ``"histogram"`` its intensity histogram (rank for rank), ``"fourier_histogram"``
      both, each mixed with the labeled patch by a weight drawn per sample from ``appearance_mix_range``: ground
      truth in the unlabeled scans' appearance; ``"labeled"`` pastes it as scanned;
    - ``labeled_appearance``: the same choices for the whole labeled batch of the supervised loss: each labeled
      patch takes the appearance of an unlabeled patch of the step, with a mixing weight drawn from
      ``appearance_mix_range`` times the unsupervised weight (so none during the warm-up): ground truth at the
      supervised loss's full weight in the unlabeled scans' appearance, with no pseudo-label involved;
    - ``student_appearance``: the same restyles for the student's unlabeled patch (after copy-paste), each patch
      in the appearance of another unlabeled patch of the step, which its teacher does not see: the teacher's
      label of a patch it sees as scanned is learnt in another scanner's look; ``"unlabeled"`` keeps it as is;
    - ``ema_teacher`` / ``ema_decay``: pseudo-labels come from an exponential moving average of the teaching
      network instead of the network itself;
    - ``distribution_alignment``: each teacher's probabilities are multiplied by (class share in the labeled
      cases) / (running mean of that teacher's predicted share on unlabeled patches) before its label is taken,
      so a teacher that starts to miss (or over-grow) a class on unlabeled scans does not pass the drift on.
    """

    loss_terms: tuple[str, ...] = ()
    unsupervised_warmup_fraction: float = 0.2
    unsupervised_rampup_fraction: float = 0.2
    pseudo_label_threshold: float | None = 0.9
    # a voxel the teacher labels background also needs this probability to count (None: no extra condition):
    # a teacher that misses an organ on a shifted scanner misses it with p(background) mostly under 0.999
    background_threshold: float | None = None
    # a patch in which the teacher labels no voxel foreground leaves the pseudo-label loss entirely: it may be a
    # patch without foreground or one where a shifted scanner hides the organ from the teacher, and only the
    # latter's "nothing here" would be learnt as a miss (docs/benchmarks.md: 57 % of domain 3's misses)
    ignore_empty_pseudo_labels: bool = False
    student_perturbation: str = "copy_paste"
    copy_paste_fraction: float = 0.5
    pasted_appearance: str = "labeled"
    # the labeled batch in an unlabeled patch's look plus a random-phase field of its power (bias, noise); measured
    # on the domain-shift benchmark, 3 paired repeats each: DiffCL 0.659 +- 0.017 against 0.625 +- 0.007 with the
    # Fourier restyle alone and 0.550 +- 0.027 as scanned; CPS 0.653 +- 0.006 against 0.622 +- 0.007 with the Fourier
    # restyle alone (docs/method.md, docs/benchmarks.md)
    labeled_appearance: str = "fourier_clutter"
    appearance_mix_range: tuple[float, float] = (0.0, 1.0)
    # the labeled batch also under a smooth multiplicative bias field (unlabeled/perturbations.bias_field) whose log
    # has an sd drawn per sample from U(0, labeled_bias_field) times the unsupervised weight; 0: none
    labeled_bias_field: float = 0.0
    # the same for the student's unlabeled patch (after its restyle; the teacher sees the patch without it)
    student_bias_field: float = 0.0
    # the student's unlabeled patch also gets a new appearance (gamma, contrast, brightness, noise, blur) that the
    # teacher does not see: a weak/strong split aimed at scanner and protocol shift (unlabeled/perturbations.py)
    student_intensity: bool = False
    student_appearance: str = "unlabeled"
    ema_teacher: bool = True
    ema_decay: float = 0.99
    distribution_alignment: bool = False
    alignment_momentum: float = 0.99     # of the running mean of each teacher's predicted class shares
    # unlabeled patches per step as a share of nnU-Net's planned (labeled) batch size: the unlabeled batch is
    # max(1, round(ratio x batch size)); below 1 it cuts the step's cost
    unlabeled_batch_ratio: float = 1.0
    # the patches of the unlabeled batch that the networks learn pseudo-labels from, as a share of it (the first
    # max(1, round(ratio x unlabeled batch))); every patch still lends its look to the labeled batch's restyle, so
    # below 1 the step is cheaper while the labeled batch keeps as many looks per step
    pseudo_label_batch_ratio: float = 1.0
    # on a dataset of a further self-training round (pseudo-labelled cases listed in dataset.json, self_training.py):
    # the share of training patches drawn from the ground-truth cases, which a uniform draw gives only their count's
    # share (4 of 52 on the benchmark); None: nnU-Net's uniform draw
    ground_truth_share: float | None = None
    grad_clip_norm: float = 12.0
    primary_name: str = "network"  # how the primary network's gradient norm is logged

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.read_environment()
        self.check_training_options()
        self.logger.local_logger = TermLogger(list(self.loss_terms) + [WEIGHT_TERM])
        self.auxiliary: dict[str, AuxiliaryNetwork] = {}
        self.ema_sources: dict[str, str] = {}  # EMA network's name -> its source (primary_name or an auxiliary)
        self.ssl_step = 0

    def read_environment(self) -> None:
        """The ``nnUNet_diffcl_*`` variables that override attributes for one run (checked next)."""
        for attribute, variable in DYNAMICS_VARIABLES.items():
            override_from_environment(self, variable, attribute, float, "a number")

    def check_training_options(self) -> None:
        """Refuse impossible dynamics before anything trains (class attribute or ``nnUNet_diffcl_*`` variable)."""
        def name(attribute: str) -> str:
            variable = DYNAMICS_VARIABLES.get(attribute)
            return f"{attribute} (nnUNet_diffcl_* variable {variable})" if variable else attribute

        for attribute in ("unsupervised_warmup_fraction", "unsupervised_rampup_fraction"):
            value = getattr(self, attribute)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{self.__class__.__name__}: {name(attribute)} must lie in [0, 1] (a share of "
                                 f"the training iterations), got {value}")
        if self.unsupervised_warmup_fraction + self.unsupervised_rampup_fraction > 1.0:
            raise ValueError(f"{self.__class__.__name__}: {name('unsupervised_warmup_fraction')} + "
                             f"{name('unsupervised_rampup_fraction')} = {self.unsupervised_warmup_fraction} + "
                             f"{self.unsupervised_rampup_fraction} exceeds 1: the ramp would not end within training")
        threshold = self.pseudo_label_threshold
        if threshold is not None and not 0.0 < threshold < 1.0:
            raise ValueError(f"{self.__class__.__name__}: {name('pseudo_label_threshold')} must lie strictly "
                             f"between 0 and 1 (a probability), or be None for no mask; got {threshold}")
        if self.background_threshold is not None and not 0.0 < self.background_threshold < 1.0:
            raise ValueError(f"{self.__class__.__name__}: background_threshold must lie strictly between 0 and 1 (a "
                             f"probability), or be None; got {self.background_threshold}")
        for attribute in ("labeled_bias_field", "student_bias_field"):
            if not 0.0 <= getattr(self, attribute) <= 3.0:
                raise ValueError(f"{self.__class__.__name__}: {attribute} must lie in [0, 3] (the largest sd of the "
                                 f"log bias field; 1 scales intensities by up to e^+-2), got "
                                 f"{getattr(self, attribute)}")
        if self.student_perturbation not in PERTURBATIONS:
            raise ValueError(f"{self.__class__.__name__}: student_perturbation must be one of {PERTURBATIONS}, got "
                             f"{self.student_perturbation!r}")
        if self.pasted_appearance not in PASTED_APPEARANCES:
            raise ValueError(f"{self.__class__.__name__}: pasted_appearance must be one of {PASTED_APPEARANCES}, got "
                             f"{self.pasted_appearance!r}")
        if self.labeled_appearance not in PASTED_APPEARANCES:
            raise ValueError(f"{self.__class__.__name__}: labeled_appearance must be one of {PASTED_APPEARANCES}, "
                             f"got {self.labeled_appearance!r}")
        if self.student_appearance not in STUDENT_APPEARANCES:
            raise ValueError(f"{self.__class__.__name__}: student_appearance must be one of {STUDENT_APPEARANCES}, "
                             f"got {self.student_appearance!r}")
        if self.pasted_appearance != "labeled" and self.student_perturbation != "copy_paste":
            raise ValueError(f"{self.__class__.__name__}: pasted_appearance = {self.pasted_appearance!r} restyles the "
                             f"box that copy-paste pastes; it needs student_perturbation = 'copy_paste', got "
                             f"{self.student_perturbation!r}")
        low, high = self.appearance_mix_range
        if not 0.0 <= low <= high <= 1.0:
            raise ValueError(f"{self.__class__.__name__}: appearance_mix_range must be (low, high) with 0 <= low <= "
                             f"high <= 1 (the unlabeled patch's share of the pasted box's appearance), got "
                             f"{self.appearance_mix_range}")
        if not 0.0 < self.copy_paste_fraction < 1.0:
            raise ValueError(f"{self.__class__.__name__}: copy_paste_fraction must lie strictly between 0 and 1, "
                             f"got {self.copy_paste_fraction}")
        if not self.unlabeled_batch_ratio > 0:
            raise ValueError(f"{self.__class__.__name__}: unlabeled_batch_ratio must be > 0 (unlabeled patches per "
                             f"labeled patch), got {self.unlabeled_batch_ratio}")
        if not 0.0 < self.pseudo_label_batch_ratio <= 1.0:
            raise ValueError(f"{self.__class__.__name__}: pseudo_label_batch_ratio must lie in (0, 1] (the share of "
                             f"the unlabeled batch that the networks learn pseudo-labels from), got "
                             f"{self.pseudo_label_batch_ratio}")
        if not 0.0 <= self.alignment_momentum < 1.0:
            raise ValueError(f"{self.__class__.__name__}: alignment_momentum must lie in [0, 1), got "
                             f"{self.alignment_momentum}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"{self.__class__.__name__}: ema_decay must lie in [0, 1), got {self.ema_decay}")
        if self.ground_truth_share is not None and not 0.0 < self.ground_truth_share < 1.0:
            raise ValueError(f"{self.__class__.__name__}: ground_truth_share must lie strictly between 0 and 1 (the "
                             f"share of training patches from ground-truth cases), or be None; got "
                             f"{self.ground_truth_share}")

    # ----------------------------------------------------------------------------------- subclass API
    def build_auxiliary_networks(self) -> dict[str, AuxiliaryNetwork]:
        """Networks trained beside ``self.network``; called once from ``initialize``."""
        return {}

    def compute_losses(self, data: torch.Tensor, target: Any, data_u: torch.Tensor, weight: float
                       ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total loss and its unweighted terms (keys = ``loss_terms``) for one step."""
        raise NotImplementedError

    def extra_checkpoint_state(self) -> dict:
        """More state to checkpoint (e.g. a memory bank); restored by ``load_extra_checkpoint_state``."""
        return {}

    def load_extra_checkpoint_state(self, state: dict) -> None:
        pass

    def check_checkpoint(self, state: dict, filename: str) -> None:
        """Refuse a checkpoint whose semi-supervised ``state`` this trainer cannot resume (before loading it)."""

    # ----------------------------------------------------------------------------------- helpers
    def unsupervised_weight(self) -> float:
        """0 during the warm-up, then the sigmoid ramp to 1 (1 at once with no ramp)."""
        total = self.num_epochs * self.num_iterations_per_epoch
        warmup = self.unsupervised_warmup_fraction * total
        if self.ssl_step < warmup:
            return 0.0
        length = self.unsupervised_rampup_fraction * total
        return 1.0 if length <= 0 else sigmoid_rampup((self.ssl_step - warmup) / length)

    def ema_copy(self, ema_name: str, source_name: str, module: nn.Module) -> AuxiliaryNetwork:
        """The auxiliary ``ema_name``: an EMA teacher of ``module`` (called ``source_name``), a frozen copy
        updated after every optimiser step and saved in the checkpoint like any auxiliary network."""
        ema = copy.deepcopy(self._bare(module))
        for p in ema.parameters():
            p.requires_grad_(False)
        ema.eval()
        self.ema_sources[ema_name] = source_name
        return AuxiliaryNetwork(ema)

    def _module_named(self, name: str) -> nn.Module:
        return self.network if name == self.primary_name else self.auxiliary[name].module

    def teacher(self, name: str) -> nn.Module:
        """What makes the pseudo-labels of the network called ``name``: its EMA teacher, else itself."""
        for ema_name, source in self.ema_sources.items():
            if source == name:
                return self.auxiliary[ema_name].module
        return self._module_named(name)

    def build_pseudo_loss(self) -> nn.Module:
        """nnU-Net's loss as ``_build_loss`` makes it, with ignore label K (= the number of outputs): the
        target of pseudo-label terms, whose masked voxels hold K."""
        if self.label_manager.has_regions:
            raise RuntimeError(f"{self.__class__.__name__} masks pseudo-labels, which needs plain label maps; this "
                               f"dataset is region-based ({self.dataset_json['labels']}). Set "
                               f"pseudo_label_threshold = None and student_perturbation = 'none' in a subclass.")
        label_manager = self.label_manager
        self.label_manager = _WithIgnoreLabel(label_manager, self.ignore_value)
        try:
            return self._build_loss()
        finally:
            self.label_manager = label_manager

    @property
    def unlabeled_batch_size(self) -> int:
        return max(1, round(self.unlabeled_batch_ratio * self.batch_size))

    @property
    def pseudo_label_batch_size(self) -> int:
        """Unlabeled patches per step that the networks learn pseudo-labels from (the first of the unlabeled batch)."""
        return max(1, round(self.pseudo_label_batch_ratio * self.unlabeled_batch_size))

    @property
    def ignore_value(self) -> int:
        return self.label_manager.num_segmentation_heads

    def pseudo_target(self, teacher_logits: torch.Tensor, keep: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's hard label (B, 1, ...) and the label with unconfident (or not ``keep``) voxels set to
        the ignore value."""
        label, confidence = label_and_confidence(teacher_logits)
        trusted = torch.ones_like(label, dtype=torch.bool) if self.pseudo_label_threshold is None else \
            confidence >= self.pseudo_label_threshold
        if self.background_threshold is not None:
            trusted &= (label != 0) | (confidence >= self.background_threshold)
        if self.ignore_empty_pseudo_labels:
            trusted &= (label != 0).flatten(1).any(1).reshape((-1,) + (1,) * (label.ndim - 1))
        if keep is not None:
            trusted &= keep
        return label, masked_pseudo_label(label, trusted, self.ignore_value)

    @torch.no_grad()
    def aligned(self, name: str, logits: torch.Tensor) -> torch.Tensor:
        """The teacher ``name``'s logits (B, K, ...) after distribution alignment (ReMixMatch, Berthelot et al.
        2020): probabilities times labeled share / running predicted share, renormalised, as log-probabilities;
        ``logits`` unchanged without ``distribution_alignment``. Updates that teacher's running share."""
        if not self.distribution_alignment:
            return logits
        record: ClassShares = self.auxiliary["class_shares"].module
        probabilities = torch.softmax(logits.float(), 1)
        running = record.update(name, probabilities.transpose(0, 1).reshape(logits.shape[1], -1).mean(1))
        probabilities = probabilities * (record.labeled / running.clamp_min(1e-8)).reshape(
            (1, -1) + (1,) * (logits.ndim - 2))
        return torch.log((probabilities / probabilities.sum(1, keepdim=True)).clamp_min(1e-12))

    def student_input(self, data: torch.Tensor, target_full: torch.Tensor, data_u: torch.Tensor,
                      pseudo_targets: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The student's unlabeled input and its targets: with copy-paste a box of the labeled patch and its
        ground truth go into the unlabeled patch and every pseudo-label, with one box per sample."""
        student, targets = data_u, pseudo_targets
        if self.student_perturbation == "copy_paste":
            box = random_boxes(data_u.shape[0], tuple(data_u.shape[2:]), self.copy_paste_fraction, data_u.device)
            # unlabeled sample i receives labeled sample i mod (labeled batch size)
            source = torch.arange(data_u.shape[0], device=data.device) % data.shape[0]
            pasted = self.restyled(data[source], data_u)
            student = copy_paste(data_u, pasted, box)
            targets = [copy_paste(t, target_full[source], box) for t in pseudo_targets]
        if self.student_appearance != "unlabeled":  # sample i in the look of unlabeled sample i - 1
            student = self.restyled(student, data_u.roll(1, 0), self.student_appearance).to(data_u.dtype)
        if self.student_bias_field > 0.0:
            student = bias_field(student, uniform_draws(0.0, self.student_bias_field, student.shape[0], None,
                                                        student.device))
        if self.student_intensity:
            student = intensity_perturbation(student)
        return student, targets

    def restyled(self, labeled: torch.Tensor, unlabeled: torch.Tensor, appearance: str | None = None,
                 scale: float = 1.0) -> torch.Tensor:
        """The labeled patches in the appearance of the unlabeled ones (same batch size) by ``appearance`` (one of
        ``PASTED_APPEARANCES``; ``pasted_appearance`` by default), one mixing weight per sample drawn from
        ``appearance_mix_range`` and multiplied by ``scale``; as they are with ``"labeled"`` or ``scale`` 0."""
        appearance = self.pasted_appearance if appearance is None else appearance
        if appearance == "labeled" or scale == 0.0:
            return labeled
        weight = scale * uniform_draws(*self.appearance_mix_range, labeled.shape[0], None, labeled.device)
        return restyle(labeled, unlabeled, appearance, weight)

    def labeled_input(self, data: torch.Tensor, data_u: torch.Tensor, weight: float) -> torch.Tensor:
        """The labeled batch the networks are trained on: under a random bias field of log-sd up to
        ``labeled_bias_field``, then restyled by ``labeled_appearance`` after the unlabeled
        patch i mod (unlabeled batch size), with the mixing weight scaled by the unsupervised ``weight``."""
        if weight == 0.0:
            return data
        if self.labeled_bias_field > 0.0:
            strength = weight * uniform_draws(0.0, self.labeled_bias_field, data.shape[0], None, data.device)
            data = bias_field(data, strength)
        if self.labeled_appearance == "labeled":
            return data
        source = torch.arange(data.shape[0], device=data_u.device) % data_u.shape[0]
        return self.restyled(data, data_u[source], self.labeled_appearance, weight).to(data.dtype)

    @property
    def student_sees_teacher_input(self) -> bool:
        """Whether the student's unlabeled input is the teacher's (no perturbation of any kind)."""
        return (self.student_perturbation == "none" and not self.student_intensity
                and self.student_appearance == "unlabeled" and self.student_bias_field == 0.0)

    @property
    def teacher_is_student_forward(self) -> bool:
        """Whether the teacher is the student itself on the student's own input (no EMA, no perturbation): then the
        student's forward pass gives the teacher's output too, and no teacher pass of its own runs."""
        return self.student_sees_teacher_input and not self.ema_teacher

    @property
    def masks_pseudo_labels(self) -> bool:
        """Whether ``pseudo_target`` can leave voxels out (threshold, background threshold, empty patches), so the
        pseudo-label loss needs the ignore label and the teachers' labels must go through ``pseudo_target``."""
        return (self.pseudo_label_threshold is not None or self.background_threshold is not None
                or self.ignore_empty_pseudo_labels)

    @contextlib.contextmanager
    def _as_primary(self, module: nn.Module) -> Iterator[None]:
        """Temporarily make ``module`` the primary network, to reuse nnU-Net's per-network methods."""
        primary = self.network
        self.network = module
        try:
            yield
        finally:
            self.network = primary

    def optimizer_for(self, module: nn.Module) -> tuple[torch.optim.Optimizer, Any]:
        """The optimiser and schedule nnU-Net (or a subclass) configures, built for another network."""
        with self._as_primary(module):
            return self.configure_optimizers()

    def new_planned_network(self) -> nn.Module:
        """Another instance of this trainer's network (fresh random initialisation)."""
        return self.build_network_architecture(self.plans_manager, self.configuration_manager,
                                               self.num_input_channels, self.label_manager.num_segmentation_heads,
                                               self.enable_deep_supervision).to(self.device)

    def _bare(self, module: nn.Module) -> nn.Module:
        module = module.module if isinstance(module, DDP) else module
        return getattr(module, "_orig_mod", module)

    def _trained(self) -> list[tuple[str, nn.Module, torch.optim.Optimizer]]:
        trained = [(self.primary_name, self.network, self.optimizer)]
        return trained + [(name, a.module, a.optimizer) for name, a in self.auxiliary.items()
                          if a.optimizer is not None]

    @property
    def logged_terms(self) -> list[str]:
        """Everything logged per epoch: the loss terms, each trained network's gradient norm, the weight."""
        return list(self.logger.local_logger.terms)

    # ----------------------------------------------------------------------------------- nnU-Net hooks
    def initialize(self) -> None:
        super().initialize()
        self.auxiliary = self.build_auxiliary_networks()
        if self.distribution_alignment:
            teachers = [self.primary_name] + [n for n, a in self.auxiliary.items() if a.optimizer is not None]
            self.auxiliary["class_shares"] = AuxiliaryNetwork(
                ClassShares(self.label_manager.num_segmentation_heads, teachers, self.alignment_momentum
                            ).to(self.device))
        self.logger.local_logger.add_terms([f"grad_norm_{name}" for name, _, _ in self._trained()])
        if self.masks_pseudo_labels or not self.student_sees_teacher_input:
            self.pseudo_loss = self.build_pseudo_loss()
        else:
            self.pseudo_loss = self.loss
        self.print_to_log_file(
            f"Semi-supervised dynamics: warm-up {self.unsupervised_warmup_fraction}, ramp "
            f"{self.unsupervised_rampup_fraction}, pseudo-label threshold {self.pseudo_label_threshold} (background "
            f"{self.background_threshold}; teacher-empty patches ignored {self.ignore_empty_pseudo_labels}), "
            f"student perturbation {self.student_perturbation}{' + intensity' if self.student_intensity else ''}, "
            f"student appearance {self.student_appearance} (bias field up to {self.student_bias_field}), pasted "
            f"appearance {self.pasted_appearance}, labeled appearance {self.labeled_appearance} (bias field up to "
            f"{self.labeled_bias_field}), pseudo-labels learnt from {self.pseudo_label_batch_size} of "
            f"{self.unlabeled_batch_size} unlabeled patches, EMA teacher "
            f"{self.ema_decay if self.ema_teacher else 'no'}")
        if self.is_ddp:
            for aux in self.auxiliary.values():
                if aux.optimizer is not None:
                    aux.module = DDP(nn.SyncBatchNorm.convert_sync_batchnorm(aux.module),
                                     device_ids=[self.local_rank] if self.device.type == "cuda" else None)

    def get_tr_and_val_datasets(self):
        train, val = super().get_tr_and_val_datasets()
        if self.ground_truth_share is not None:
            pseudo = pseudo_labelled_cases(self.dataset_json)
            train.identifiers, share = ground_truth_weighted(train.identifiers, pseudo, self.ground_truth_share)
            self.print_to_log_file(f"Ground-truth share of the training draws: {share:.3f} (asked "
                                   f"{self.ground_truth_share}; {len(pseudo)} pseudo-labelled case(s) in dataset.json)")
        return train, val

    def get_dataloaders(self):
        raw = join(str(nnUNet_raw), self.plans_manager.dataset_name) if nnUNet_raw.is_set() else None
        cases = check_unlabeled_data(self.preprocessed_dataset_folder_base, self.plans_manager.plans,
                                     self.configuration_name, self.configuration_manager.configuration,
                                     self.dataset_json, raw)
        train, val = super().get_dataloaders()
        folder = unlabeled_folder(self.preprocessed_dataset_folder_base, self.configuration_manager.data_identifier)
        missing = [c for c in cases if c not in set(self.dataset_class.get_identifiers(folder))]
        if missing:
            raise RuntimeError(f"{folder} lacks the preprocessed unlabeled case(s) {missing[:5]} that its manifest "
                               f"lists: rerun nnUNetv2_diffcl preprocess_unlabeled for this dataset.")
        if self.distribution_alignment:
            shares = labeled_class_shares(data_loader_of(train)._data, self.label_manager.num_segmentation_heads)
            self.auxiliary["class_shares"].module.set_labeled(shares)
            self.print_to_log_file(f"Distribution alignment: class shares of the labeled cases "
                                   f"{[round(float(v), 5) for v in shares]}")
        loader_u = unlabeled_loader_like(data_loader_of(train), self.dataset_class(folder, cases),
                                         self.unlabeled_batch_size, self.label_manager)
        augmenter_u = augmenter_for(loader_u, pin_memory=self.device.type == "cuda")
        _ = next(augmenter_u)
        self.print_to_log_file(f"Unlabeled data: {len(cases)} case(s) from {folder}, batch size "
                               f"{self.unlabeled_batch_size}")
        return SemiSupervisedBatches(train, augmenter_u), val

    def on_train_end(self) -> None:
        super().on_train_end()
        if isinstance(self.dataloader_train, SemiSupervisedBatches):
            self.dataloader_train._finish()

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        for aux in self.auxiliary.values():
            if aux.optimizer is not None:
                aux.module.train()
            if aux.lr_scheduler is not None:
                aux.lr_scheduler.step(self.current_epoch)

    def train_step(self, batch: dict) -> dict:
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"]
        target = ([t.to(self.device, non_blocking=True) for t in target] if isinstance(target, list)
                  else target.to(self.device, non_blocking=True))
        data_u = batch[UNLABELED_KEY]["data"].to(self.device, non_blocking=True)
        weight = self.unsupervised_weight()
        trained = self._trained()
        for _, _, optimizer in trained:
            optimizer.zero_grad(set_to_none=True)
        data = self.labeled_input(data, data_u, weight)
        with autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context():
            total, terms = self.compute_losses(data, target, data_u[: self.pseudo_label_batch_size], weight)
        self.ssl_step += 1
        logged = {k: float(v.detach()) if isinstance(v, torch.Tensor) else float(v) for k, v in terms.items()}
        logged[WEIGHT_TERM] = weight
        if not torch.isfinite(total):
            self.print_to_log_file(f"WARNING: non-finite loss ({float(total.detach())}) in step {self.ssl_step}, terms "
                                   f"{logged}: step skipped, weights unchanged.")
            for _, _, optimizer in trained:
                optimizer.zero_grad(set_to_none=True)
            return {"loss": np.nan, **logged, **{f"grad_norm_{name}": np.nan for name, _, _ in trained}}
        scaler = self.grad_scaler
        (scaler.scale(total) if scaler is not None else total).backward()
        # a network that got no gradient rests this step (DiffCL's ds_train_every; the head in the warm-up): no
        # clipping, no optimizer step (a grad scaler refuses an optimizer without gradients), its norm not logged
        learning = [entry for entry in trained if any(p.grad is not None for p in entry[1].parameters())]
        for name, _, _ in trained:
            logged[f"grad_norm_{name}"] = np.nan
        for name, module, optimizer in learning:
            if scaler is not None:
                scaler.unscale_(optimizer)
            # the norm before clipping: how hard each network is pushed (logged per epoch)
            logged[f"grad_norm_{name}"] = float(nn.utils.clip_grad_norm_(module.parameters(), self.grad_clip_norm))
        for _, _, optimizer in learning:
            if scaler is not None:
                scaler.step(optimizer)
            else:
                optimizer.step()
        if scaler is not None:
            scaler.update()
        for ema_name, source in self.ema_sources.items():
            ema_update(self.auxiliary[ema_name].module, self._bare(self._module_named(source)), self.ema_decay)
        return {"loss": float(total.detach()), **logged}

    def on_train_epoch_end(self, train_outputs: list[dict]) -> None:
        outputs = collate_outputs(train_outputs)
        skipped = int(np.sum(np.isnan(outputs["loss"])))
        if skipped:
            self.print_to_log_file(f"WARNING: {skipped} of {len(train_outputs)} steps skipped (non-finite loss)")
        for key in ["loss"] + self.logged_terms:
            values = np.asarray(outputs[key], dtype=np.float64)
            if self.is_ddp:
                gathered = [None] * dist.get_world_size()
                dist.all_gather_object(gathered, values)
                values = np.concatenate(gathered)
            mean = float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")
            self.logger.log("train_losses" if key == "loss" else TERM_PREFIX + key, mean, self.current_epoch)

    def on_epoch_end(self) -> None:
        terms = ", ".join(f"{t} {self.logger.get_value(TERM_PREFIX + t, step=-1):.4f}" for t in self.logged_terms)
        self.print_to_log_file(f"train terms: {terms}")
        super().on_epoch_end()

    # ----------------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self, filename: str) -> None:
        if self.local_rank != 0 or self.disable_checkpointing:
            return super().save_checkpoint(filename)
        # nnU-Net writes its part; ours is added and the file replaced atomically, so a crash while
        # saving never leaves a truncated checkpoint under the real name
        partial = filename + ".partial"
        super().save_checkpoint(partial)
        checkpoint = torch.load(partial, map_location="cpu", weights_only=False)
        checkpoint[CHECKPOINT_KEY] = {
            "ssl_step": self.ssl_step,
            "networks": {name: self._bare(a.module).state_dict() for name, a in self.auxiliary.items()},
            "optimizers": {name: a.optimizer.state_dict() for name, a in self.auxiliary.items()
                           if a.optimizer is not None},
            "extra": self.extra_checkpoint_state(),
        }
        torch.save(checkpoint, partial)
        os.replace(partial, filename)

    def load_checkpoint(self, filename_or_checkpoint: str | dict) -> None:
        if isinstance(filename_or_checkpoint, dict):
            raise TypeError("pass the checkpoint's path: nnU-Net 2.8's load_checkpoint cannot take a dict")
        checkpoint = torch.load(filename_or_checkpoint, map_location=self.device, weights_only=False)
        state = checkpoint.get(CHECKPOINT_KEY)
        if state is None:
            raise RuntimeError(
                f"{filename_or_checkpoint} was written by {checkpoint.get('trainer_name')} and holds no "
                f"semi-supervised state, so {self.__class__.__name__} cannot resume from it. Start a new training "
                f"(without --c), or use -pretrained_weights to start from its network weights.")
        self.check_checkpoint(state, filename_or_checkpoint)
        super().load_checkpoint(filename_or_checkpoint)
        for name, aux in self.auxiliary.items():
            if name not in state["networks"]:
                raise RuntimeError(f"{filename_or_checkpoint} lacks the auxiliary network '{name}'")
            self._bare(aux.module).load_state_dict(state["networks"][name])
            if aux.optimizer is not None:
                aux.optimizer.load_state_dict(state["optimizers"][name])
        self.ssl_step = int(state["ssl_step"])
        self.load_extra_checkpoint_state(state.get("extra", {}))


# ------------------------------------------------------------------------------------------------ ablations
# Mixins for the dynamics ablations, shared by CPSTrainer and DiffCLTrainer variants (``Trainer_noWarmup`` =
# ``NoWarmup, Trainer``): one definition of what each ablation switches off.
class NoWarmup:
    """Ablation: the unsupervised weight ramps up from the first step (no labeled-only warm-up)."""

    unsupervised_warmup_fraction = 0.0


class NoConfidenceMask:
    """Ablation: every pseudo-labeled voxel counts, however unsure its teacher."""

    pseudo_label_threshold = None


class NoPerturbation:
    """Ablation: student and teacher see the same unlabeled patch (no copy-paste)."""

    student_perturbation = "none"


class NoEMA:
    """Ablation: a network's own current prediction is the pseudo-label it teaches (no EMA teacher)."""

    ema_teacher = False


class LateStart:
    """The teachers start once labeled-only nnU-Net is close to its plateau: half of training is the labeled-only
    warm-up (at 2000 steps on the domain-shift benchmark, labeled-only nnU-Net gains 0.076 Dice from 500 to 1000
    steps and 0.015 from 1000 to 2000), so pseudo-labels never come from an immature teacher."""

    unsupervised_warmup_fraction = 0.5
    unsupervised_rampup_fraction = 0.2


class NoLabeledRestyle:
    """Ablation: the labeled batch is trained on as scanned, never in an unlabeled patch's appearance
    (``labeled_appearance = "labeled"``; the default of CPSTrainer and DiffCLTrainer before 2026-12-05)."""

    labeled_appearance = "labeled"


class OriginalDynamics(NoWarmup, NoConfidenceMask, NoPerturbation, NoEMA, NoLabeledRestyle):
    """The dynamics as first built here: no warm-up, ramp over the first 10 %, no mask, no perturbation, no EMA,
    the labeled batch as scanned."""

    unsupervised_rampup_fraction = 0.1


class DistributionAlignment:
    """Each teacher's probabilities are aligned to the labeled cases' class shares before its pseudo-label is taken
    (``distribution_alignment``): drift towards missing or over-growing a class on unlabeled scans is countered."""

    distribution_alignment = True


class FourierPaste:
    """The labeled box pasted into the student's unlabeled patch takes that patch's Fourier amplitude (its
    appearance), so the student learns ground truth as the unlabeled scans' scanners show it."""

    pasted_appearance = "fourier"


class HistogramPaste:
    """The labeled box pasted into the student's unlabeled patch takes that patch's intensity histogram, so the
    student learns ground truth at the unlabeled scans' intensity scale and contrast."""

    pasted_appearance = "histogram"


class StrongRestyle:
    """Every labeled patch at least half-way to its unlabeled patch's appearance once the ramp is done
    (``appearance_mix_range = (0.5, 1.0)`` instead of (0, 1)). Measured (repeat 1, 2000 steps): the control
    0.635 against 0.615, DiffCL 0.630 against 0.631 (docs/benchmarks.md)."""

    appearance_mix_range = (0.5, 1.0)


class ClutterRestyle:
    """The labeled patch's restyle also adds a random-phase field with the unlabeled patch's Fourier amplitude
    (``labeled_appearance = "fourier_clutter"``, ``spectrum_clutter``): the power of a bias field and noise
    spread over the image, which lowers each tissue's contrast as the harder scanners do."""

    labeled_appearance = "fourier_clutter"


class BackgroundThreshold:
    """A teacher's background label counts only where its probability is at least 0.999 (other labels keep
    ``pseudo_label_threshold``): on the domain-shift benchmark a trained DiffCL model's missed organ voxels have
    p(background) >= 0.9 for 29-89 % of them (domains 0-3), >= 0.999 for 0-43 %, while 92-95 % of the true
    background reaches 0.999; so the student is no longer taught to miss what its teacher missed. Measured (DiffCL,
    repeat 1): 0.642 against the default's 0.672, the organ over-grown on domain 3 (docs/benchmarks.md)."""

    background_threshold = 0.999


class IgnoreEmpty:
    """A patch in which the teacher finds no foreground teaches nothing (``ignore_empty_pseudo_labels``): a trained
    DiffCL model misses 57 % of domain 3's organ and lesion voxels in slices where it predicts nothing at all, and
    its confident "nothing" there would otherwise be learnt as background (docs/benchmarks.md)."""

    ignore_empty_pseudo_labels = True


class BiasField:
    """The labeled batch also under a smooth bias field (``labeled_bias_field = 1.0``) before its restyle: on the
    domain-shift benchmark domain 3's organ lies within 0.5 z of the background's mean in half of its slices, which
    no restyle of a domain-0 slice reaches (``benchmarks/organ_contrast.py``). Measured on the control
    (``LabeledOnlyTrainer_biasField``, repeat 1): 0.613 against 0.627, domain 3 missed more (docs/benchmarks.md)."""

    labeled_bias_field = 1.0


class StudentClutter:
    """The labeled batch and the student's unlabeled patch both in another unlabeled patch's look, with the clutter
    field (``labeled_appearance = student_appearance = "fourier_clutter"``): ground truth and the teacher's labels
    of the scans it reads best, learnt in the hardest scanners' appearance. Measured (3 paired repeats): 0.662 +-
    0.006 against the default's 0.659 +- 0.017, domain 3's organ better in each repeat, the lesion of domains 1-2
    worse: level with the default (docs/benchmarks.md)."""

    labeled_appearance = "fourier_clutter"
    student_appearance = "fourier_clutter"


class StyledPaste:
    """The labeled box pasted into the student's unlabeled patch takes that patch's Fourier amplitude and then its
    intensity histogram: ground truth in the unlabeled scans' appearance, scale and contrast."""

    pasted_appearance = "fourier_histogram"
