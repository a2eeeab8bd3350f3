"""DiffCLTrainer: Diff-CL (Guo et al., 2025) on nnU-Net's plans.

Networks
- CS (``self.network``): nnU-Net's planned network with HF-Mamba at the bottleneck (HFMambaTrainer's
  builder, so ``nnUNetv2_predict`` loads it from ``network_weights`` with nothing extra);
- DS (auxiliary ``"ds"``): a time-conditioned denoiser with the planned topology that predicts the
  clean label (K logits) from the image and a noisy one-hot label;
- a projection head on CS's highest-resolution decoder features (auxiliary ``"projection_head"``) and
  a per-class FIFO memory bank of embeddings (auxiliary ``"memory_bank"``, saved, not trained).

One training step, with L = nnU-Net's Dice + CE (deep supervision as nnU-Net):

    cs_sup     = L(CS(x_l), y_l)
    ds_sup     = L(DS(x_l, q(y_l, t), t), y_l)                       t ~ U{0..T-1}
    ds_label   = argmax DDIM_S(DS, x_u)                              (no gradient)
    cs_label   = argmax CS(x_u)                                      (detached)
    cs_pseudo  = L(CS(x_u), ds_label)
    ds_pseudo  = L(DS(x_u, q(cs_label, t'), t'), cs_label)
    contrast   = InfoNCE(unlabeled embeddings where cs_label == ds_label, labelled by ds_label,
                         against the bank of correctly predicted labeled embeddings)
    total      = cs_sup + ds_sup + ramp(t) * (mu1 * ds_pseudo + mu2 * (cs_pseudo + eta * contrast))

Each network runs one forward pass per step over the labeled and unlabeled batch together (what
DDP needs, and faster). The agreement rate between the two pseudo-labels is logged.
"""

from __future__ import annotations

from typing import Any

import torch

from nnunetv2_diffcl.diffusion import (
    DDIMSampler,
    NoiseSchedule,
    label_map_to_signal,
    q_sample,
    sample_timesteps,
)
from nnunetv2_diffcl.losses.contrastive import (
    ClassMemoryBank,
    ProjectionHead,
    all_gather_samples,
    sample_per_class,
    supervised_infonce,
)
from nnunetv2_diffcl.losses.pseudo_labels import hard_pseudo_label, split_batch, targets_like
from nnunetv2_diffcl.network_architectures.cnn_branch import forward_capturing_features
from nnunetv2_diffcl.network_architectures.denoiser import build_denoiser
from nnunetv2_diffcl.trainers.hf_mamba import HFMambaTrainer
from nnunetv2_diffcl.trainers.semi_supervised import AuxiliaryNetwork, SemiSupervisedTrainer


class DiffCLTrainer(SemiSupervisedTrainer, HFMambaTrainer):
    loss_terms = ("cs_sup", "ds_sup", "cs_pseudo", "ds_pseudo", "contrast", "agreement")

    # objective (paper's notation)
    mu1: float = 1.0
    mu2: float = 1.0
    eta: float = 0.1
    # diffusion branch
    diffusion_timesteps: int = 1000
    noise_schedule: str = "linear"
    ddim_steps: int = 10
    # contrastive label propagation
    use_contrastive: bool = True
    contrastive_temperature: float = 0.1
    embed_dim: int = 64
    bank_capacity: int = 2048            # per class
    bank_samples_per_class: int = 256    # labeled voxels pushed per class and step (per rank)
    query_samples_per_class: int = 256   # unlabeled voxels contrasted per class and step

    def initialize(self) -> None:
        if self.label_manager.has_regions or self.label_manager.has_ignore_label:
            raise RuntimeError(f"{self.__class__.__name__} supports plain label maps only (no region-based "
                               f"training, no ignore label); this dataset's labels: {self.dataset_json['labels']}")
        super().initialize()
        self.schedule = NoiseSchedule(self.diffusion_timesteps, self.noise_schedule).to(self.device)
        self.sampler = DDIMSampler(self.schedule, self.ddim_steps)
        self.print_to_log_file(f"Diff-CL: mu1 {self.mu1}, mu2 {self.mu2}, eta {self.eta}, T "
                               f"{self.diffusion_timesteps} ({self.noise_schedule}), DDIM steps {self.ddim_steps}, "
                               f"HF-Mamba stages {self.hf_mamba_stages}, contrastive {self.use_contrastive}")

    @property
    def num_classes(self) -> int:
        return self.label_manager.num_segmentation_heads

    def build_auxiliary_networks(self) -> dict[str, AuxiliaryNetwork]:
        ds = build_denoiser(self.plans_manager, self.configuration_manager, self.num_input_channels,
                            self.num_classes, self.enable_deep_supervision).to(self.device)
        aux = {"ds": AuxiliaryNetwork(ds, *self.optimizer_for(ds))}
        if self.use_contrastive:
            features = self.configuration_manager.network_arch_init_kwargs["features_per_stage"][0]
            conv_op = type(self._bare(self.network).decoder.seg_layers[-1])
            head = ProjectionHead(features, self.embed_dim, conv_op).to(self.device)
            aux["projection_head"] = AuxiliaryNetwork(head, *self.optimizer_for(head))
            bank = ClassMemoryBank(self.num_classes, self.embed_dim, self.bank_capacity).to(self.device)
            aux["memory_bank"] = AuxiliaryNetwork(bank)
        return aux

    # ------------------------------------------------------------------------------------------ pieces
    def sample_ds_pseudo_label(self, image: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """DS's label for ``image`` by DDIM sampling from pure noise (no gradient): (B, 1, *spatial)."""
        ds = self.auxiliary["ds"].module
        logits = self.sampler.sample(lambda img, x_t, t: ds(img, x_t, t), image, self.num_classes, generator)
        return hard_pseudo_label(logits, has_regions=False)

    def noised(self, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A label map (B, 1, ...) as DS's noisy input at random timesteps: (x_t, t)."""
        t = sample_timesteps(label.shape[0], self.diffusion_timesteps, device=label.device)
        return q_sample(self.schedule, label_map_to_signal(label, self.num_classes), t), t

    def contrastive_loss(self, embeddings_l: torch.Tensor, embeddings_u: torch.Tensor, target_l: torch.Tensor,
                         cs_logits_l: torch.Tensor, cs_label_u: torch.Tensor, ds_label_u: torch.Tensor
                         ) -> torch.Tensor:
        bank: ClassMemoryBank = self.auxiliary["memory_bank"].module
        agree = (cs_label_u == ds_label_u)[:, 0]
        queries, query_labels = sample_per_class(embeddings_u, ds_label_u[:, 0], agree,
                                                 self.query_samples_per_class, self.num_classes)
        keys, key_labels = bank.keys()
        loss = supervised_infonce(queries, query_labels, keys, key_labels, self.contrastive_temperature)
        # the bank learns only from labeled voxels that CS gets right; its entries are detached copies
        with torch.no_grad():
            correct = (cs_logits_l.argmax(1) == target_l[:, 0].long())
            new, new_labels = sample_per_class(embeddings_l.detach(), target_l[:, 0].long(), correct,
                                               self.bank_samples_per_class, self.num_classes)
            bank.push(*all_gather_samples(new, new_labels))
        return loss

    def second_branch(self, both: torch.Tensor, target_l: torch.Tensor, cs_label_u: torch.Tensor
                      ) -> tuple[Any, torch.Tensor]:
        """DS's outputs on [labeled; unlabeled] and its pseudo-label of the unlabeled half.

        DS denoises the ground truth (labeled) and CS's pseudo-label (unlabeled), each noised at a
        random timestep; its own pseudo-label comes from DDIM sampling from pure noise.
        """
        n = target_l.shape[0]
        ds_label_u = self.sample_ds_pseudo_label(both[n:])
        x_t_l, t_l = self.noised(target_l)
        x_t_u, t_u = self.noised(cs_label_u)
        ds_out = self.auxiliary["ds"].module(both, torch.cat([x_t_l, x_t_u]), torch.cat([t_l, t_u]))
        return ds_out, ds_label_u

    # ------------------------------------------------------------------------------------------ one step
    def compute_losses(self, data: torch.Tensor, target: Any, data_u: torch.Tensor, weight: float
                       ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        n = data.shape[0]
        target_full = target[0] if isinstance(target, list) else target
        both = torch.cat([data, data_u])

        cs_out, cs_features = forward_capturing_features(self.network, self._bare(self.network).decoder, both)
        cs_l, cs_u = split_batch(cs_out, n)
        cs_logits_l = cs_l[0] if isinstance(cs_l, list) else cs_l
        cs_logits_u = cs_u[0] if isinstance(cs_u, list) else cs_u
        cs_label_u = hard_pseudo_label(cs_logits_u.detach(), has_regions=False)
        ds_out, ds_label_u = self.second_branch(both, target_full, cs_label_u)
        ds_l, ds_u = split_batch(ds_out, n)

        terms = {
            "cs_sup": self.loss(cs_l, target),
            "ds_sup": self.loss(ds_l, target),
            "cs_pseudo": self.loss(cs_u, targets_like(ds_label_u, cs_u)),
            "ds_pseudo": self.loss(ds_u, targets_like(cs_label_u, ds_u)),
        }
        if self.use_contrastive:
            embeddings = self.auxiliary["projection_head"].module(cs_features)
            emb_l, emb_u = split_batch(embeddings, n)
            terms["contrast"] = self.contrastive_loss(emb_l, emb_u, target_full, cs_logits_l, cs_label_u,
                                                      ds_label_u)
        else:
            terms["contrast"] = torch.zeros((), device=data.device)
        total = (terms["cs_sup"] + terms["ds_sup"]
                 + weight * (self.mu1 * terms["ds_pseudo"]
                             + self.mu2 * (terms["cs_pseudo"] + self.eta * terms["contrast"])))
        terms["agreement"] = (cs_label_u == ds_label_u).float().mean()
        return total, terms


class DiffCLTrainer_noHFMamba(DiffCLTrainer):
    """Ablation: CS is nnU-Net's plain planned network."""

    hf_mamba_stages = 0


class DiffCLTrainer_noContrastive(DiffCLTrainer):
    """Ablation: no projection head, memory bank or contrastive term."""

    use_contrastive = False


class DiffCLTrainer_noDiffusion(DiffCLTrainer):
    """Ablation: a second CNN of the same architecture in place of DS (cross pseudo-supervision of two
    CNNs, with HF-Mamba and the contrastive term); its argmax replaces DS's sampled pseudo-label."""

    def build_auxiliary_networks(self) -> dict[str, AuxiliaryNetwork]:
        aux = super().build_auxiliary_networks()
        second = self.new_planned_network()
        aux["ds"] = AuxiliaryNetwork(second, *self.optimizer_for(second))
        return aux

    def second_branch(self, both: torch.Tensor, target_l: torch.Tensor, cs_label_u: torch.Tensor
                      ) -> tuple[Any, torch.Tensor]:
        out = self.auxiliary["ds"].module(both)
        logits_u = (out[0] if isinstance(out, list) else out)[target_l.shape[0]:]
        return out, hard_pseudo_label(logits_u.detach(), has_regions=False)


class DiffCLTrainer_DDIM1(DiffCLTrainer):
    ddim_steps = 1


class DiffCLTrainer_DDIM3(DiffCLTrainer):
    ddim_steps = 3


class DiffCLTrainer_DDIM5(DiffCLTrainer):
    ddim_steps = 5


class DiffCLTrainer_DDIM20(DiffCLTrainer):
    ddim_steps = 20
