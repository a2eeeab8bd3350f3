"""Cross pseudo-supervision (CPS; Chen et al., CVPR 2021) on nnU-Net's planned network.

Two networks from the same plans, initialised differently, both trained on the labeled batch with
nnU-Net's Dice + CE (deep supervision as nnU-Net), and each trained on the other's hard (argmax)
pseudo-label of the unlabeled batch:

    L = L_sup(A) + L_sup(B) + w(t) * cps_weight * (L(A, label_B) + L(B, label_A))

with the base class's dynamics: w(t) = 0 during the warm-up (then the step is two labeled-only nnU-Net
steps), the teachers' labels masked where they are unconfident, the student's unlabeled input perturbed
more strongly than the teacher's (copy-paste of a labeled box), and label_X from an EMA of X.

Network A is ``self.network``: it is saved as ``network_weights`` and used by ``nnUNetv2_predict``.
"""

from __future__ import annotations

from typing import Any

import torch

from nnunetv2_diffcl.losses.pseudo_labels import full_resolution, pseudo_label_targets, split_batch, targets_like
from nnunetv2_diffcl.trainers.semi_supervised import (
    AuxiliaryNetwork,
    BackgroundThreshold,
    DistributionAlignment,
    FourierPaste,
    HistogramPaste,
    LateStart,
    NoConfidenceMask,
    NoEMA,
    NoLabeledRestyle,
    NoPerturbation,
    NoWarmup,
    OriginalDynamics,
    SemiSupervisedTrainer,
    StyledPaste,
)


class CPSTrainer(SemiSupervisedTrainer):
    """Two planned networks teaching each other (Chen et al., 2021). Variants change SemiSupervisedTrainer's
    attributes: the dynamics (warm-up, ramp, threshold, perturbation, EMA teachers) and ``unlabeled_batch_ratio``."""

    loss_terms = ("sup_a", "sup_b", "pseudo_a", "pseudo_b")
    primary_name = "a"
    cps_weight: float = 1.0

    def build_auxiliary_networks(self) -> dict[str, AuxiliaryNetwork]:
        network_b = self.new_planned_network()
        aux = {"network_b": AuxiliaryNetwork(network_b, *self.optimizer_for(network_b))}
        if self.ema_teacher:
            aux["ema_a"] = self.ema_copy("ema_a", self.primary_name, self.network)
            aux["ema_b"] = self.ema_copy("ema_b", "network_b", network_b)
        return aux

    def compute_losses(self, data: torch.Tensor, target: Any, data_u: torch.Tensor, weight: float
                       ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        network_b = self.auxiliary["network_b"].module
        if weight == 0.0:  # warm-up: exactly nnU-Net's labeled-only step for each network
            terms = {"sup_a": self.loss(self.network(data), target), "sup_b": self.loss(network_b(data), target)}
            zero = torch.zeros((), device=data.device)
            return terms["sup_a"] + terms["sup_b"], {**terms, "pseudo_a": zero, "pseudo_b": zero}
        n = data.shape[0]
        if self.teacher_is_student_forward and not self.masks_pseudo_labels and not self.distribution_alignment:
            # the original CPS: one pass per network, each one's unlabeled output teaches the other
            labeled_a, unlabeled_a = split_batch(self.network(torch.cat([data, data_u])), n)
            labeled_b, unlabeled_b = split_batch(network_b(torch.cat([data, data_u])), n)
            target_a = pseudo_label_targets(unlabeled_b, self.label_manager.has_regions)
            target_b = pseudo_label_targets(unlabeled_a, self.label_manager.has_regions)
        else:
            with torch.no_grad():  # the teachers see the unlabeled patch as the loader gave it
                _, label_for_b = self.pseudo_target(self.aligned(
                    self.primary_name, full_resolution(self.teacher(self.primary_name)(data_u))))
                _, label_for_a = self.pseudo_target(self.aligned(
                    "network_b", full_resolution(self.teacher("network_b")(data_u))))
            target_full = target[0] if isinstance(target, list) else target
            student_u, (label_for_a, label_for_b) = self.student_input(data, target_full, data_u,
                                                                       [label_for_a, label_for_b])
            labeled_a, unlabeled_a = split_batch(self.network(torch.cat([data, student_u])), n)
            labeled_b, unlabeled_b = split_batch(network_b(torch.cat([data, student_u])), n)
            target_a, target_b = targets_like(label_for_a, unlabeled_a), targets_like(label_for_b, unlabeled_b)
        terms = {
            "sup_a": self.loss(labeled_a, target),
            "sup_b": self.loss(labeled_b, target),
            "pseudo_a": self.pseudo_loss(unlabeled_a, target_a),
            "pseudo_b": self.pseudo_loss(unlabeled_b, target_b),
        }
        total = terms["sup_a"] + terms["sup_b"] + weight * self.cps_weight * (terms["pseudo_a"] + terms["pseudo_b"])
        return total, terms


class CPSTrainer_noWarmup(NoWarmup, CPSTrainer):
    __doc__ = NoWarmup.__doc__


class CPSTrainer_noConfidenceMask(NoConfidenceMask, CPSTrainer):
    __doc__ = NoConfidenceMask.__doc__


class CPSTrainer_noPerturbation(NoPerturbation, CPSTrainer):
    __doc__ = NoPerturbation.__doc__


class CPSTrainer_noEMA(NoEMA, CPSTrainer):
    __doc__ = NoEMA.__doc__


class CPSTrainer_original(OriginalDynamics, CPSTrainer):
    """CPS as first built here (OriginalDynamics): each network's own argmax on the same patch."""


class CPSTrainer_strongIntensity(CPSTrainer):
    """The student's unlabeled patch also gets a new appearance the teachers do not see (``student_intensity``)."""

    student_intensity = True


class CPSTrainer_250epochs(CPSTrainer):
    """CPSTrainer for 250 epochs instead of nnU-Net's 1000 (``schedule_epochs``), as nnUNetTrainer_250epochs."""

    schedule_epochs = 250


class CPSTrainer_aligned(DistributionAlignment, CPSTrainer):
    __doc__ = DistributionAlignment.__doc__


class CPSTrainer_fourierPaste(FourierPaste, CPSTrainer):
    __doc__ = FourierPaste.__doc__


class CPSTrainer_noLabeledRestyle(NoLabeledRestyle, CPSTrainer):
    __doc__ = NoLabeledRestyle.__doc__


class CPSTrainer_lateStart(LateStart, CPSTrainer):
    __doc__ = LateStart.__doc__


class CPSTrainer_histogramPaste(HistogramPaste, CPSTrainer):
    __doc__ = HistogramPaste.__doc__


class CPSTrainer_styledPaste(StyledPaste, CPSTrainer):
    __doc__ = StyledPaste.__doc__


class CPSTrainer_bgThreshold(BackgroundThreshold, CPSTrainer):
    __doc__ = BackgroundThreshold.__doc__


class CPSTrainer_fourierRestyle(CPSTrainer):
    """The labeled batch restyled by the Fourier amplitude alone, without the clutter field (``labeled_appearance =
    "fourier"``; CPSTrainer's default from the fourth to the eighth session): 0.622 +- 0.007 against the clutter
    default's 0.653 +- 0.006 on the domain-shift benchmark (docs/benchmarks.md)."""

    labeled_appearance = "fourier"
