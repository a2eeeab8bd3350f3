"""Cross pseudo-supervision (CPS; Chen et al., CVPR 2021) on nnU-Net's planned network.

Two networks from the same plans, initialised differently, both trained on the labeled batch with
nnU-Net's Dice + CE (deep supervision as nnU-Net), and each trained on the other's hard (argmax)
pseudo-label of the unlabeled batch:

    L = L_sup(A) + L_sup(B) + ramp(t) * cps_weight * (L(A, argmax B) + L(B, argmax A))

Network A is ``self.network``: it is saved as ``network_weights`` and used by ``nnUNetv2_predict``.
"""

from __future__ import annotations

from typing import Any

import torch

from nnunetv2_diffcl.losses.pseudo_labels import pseudo_label_targets, split_batch
from nnunetv2_diffcl.trainers.semi_supervised import AuxiliaryNetwork, SemiSupervisedTrainer


class CPSTrainer(SemiSupervisedTrainer):
    loss_terms = ("sup_a", "sup_b", "pseudo_a", "pseudo_b")
    cps_weight: float = 1.0

    def build_auxiliary_networks(self) -> dict[str, AuxiliaryNetwork]:
        network_b = self.new_planned_network()
        return {"network_b": AuxiliaryNetwork(network_b, *self.optimizer_for(network_b))}

    def compute_losses(self, data: torch.Tensor, target: Any, data_u: torch.Tensor, weight: float
                       ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        network_b = self.auxiliary["network_b"].module
        both = torch.cat([data, data_u])
        # one pass per network over labeled + unlabeled (instance norm keeps samples independent)
        labeled_a, unlabeled_a = split_batch(self.network(both), data.shape[0])
        labeled_b, unlabeled_b = split_batch(network_b(both), data.shape[0])
        regions = self.label_manager.has_regions
        terms = {
            "sup_a": self.loss(labeled_a, target),
            "sup_b": self.loss(labeled_b, target),
            "pseudo_a": self.loss(unlabeled_a, pseudo_label_targets(unlabeled_b, regions)),
            "pseudo_b": self.loss(unlabeled_b, pseudo_label_targets(unlabeled_a, regions)),
        }
        total = terms["sup_a"] + terms["sup_b"] + weight * self.cps_weight * (terms["pseudo_a"] + terms["pseudo_b"])
        return total, terms
