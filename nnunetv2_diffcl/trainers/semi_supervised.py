"""The one place for "labeled batch + unlabeled batch -> losses -> optimiser steps".

:class:`SemiSupervisedTrainer` is nnU-Net's trainer with

- a training loader that yields an unlabeled batch beside each labeled one (data/semi_supervised_loader);
- auxiliary networks with their own optimiser and learning-rate schedule (CPS's second network,
  Diff-CL's diffusion branch, ...), trained in the same step, saved in and restored from checkpoints;
- a sigmoid ramp-up of the unsupervised weight over the first ``unsupervised_rampup_fraction`` of the
  training iterations;
- per-term logging (log file and progress.png), and a step that is skipped, with a warning, when the
  loss is not finite.

Subclasses define ``loss_terms``, ``build_auxiliary_networks`` and ``compute_losses``. nnU-Net's
``run_training`` loop, validation, checkpoint names and prediction stay as they are: ``self.network``
is the network nnU-Net saves as ``network_weights`` and ``nnUNetv2_predict`` uses.
"""

from __future__ import annotations

import contextlib
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
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.collate_outputs import collate_outputs
from nnunetv2.utilities.helpers import dummy_context
from torch import autocast, nn
from torch.nn.parallel import DistributedDataParallel as DDP

from nnunetv2_diffcl.data.semi_supervised_loader import (
    UNLABELED_KEY,
    SemiSupervisedBatches,
    augmenter_for,
    data_loader_of,
    unlabeled_loader_like,
)
from nnunetv2_diffcl.data.unlabeled import check_unlabeled_data, unlabeled_folder
from nnunetv2_diffcl.trainers.term_logger import TERM_PREFIX, TermLogger

CHECKPOINT_KEY = "semi_supervised"
WEIGHT_TERM = "unsupervised_weight"


def sigmoid_rampup(progress: float) -> float:
    """exp(-5 (1 - x)^2) for x = progress clipped to [0, 1] (Laine & Aila, 2017): 0.0067 -> 1."""
    x = min(max(progress, 0.0), 1.0)
    return float(math.exp(-5.0 * (1.0 - x) ** 2))


def apply_schedule_overrides(trainer: nnUNetTrainer) -> None:
    """``nnUNet_diffcl_epochs``, ``_iterations`` and ``_val_iterations`` shorten a schedule (demo, tests).

    Environment variables rather than arguments because nnU-Net's trainer signature is fixed.
    """
    for var, attr in (("nnUNet_diffcl_epochs", "num_epochs"),
                      ("nnUNet_diffcl_iterations", "num_iterations_per_epoch"),
                      ("nnUNet_diffcl_val_iterations", "num_val_iterations_per_epoch")):
        value = os.environ.get(var)
        if value:
            try:
                setattr(trainer, attr, int(value))
            except ValueError:
                raise ValueError(f"{var} must be a whole number, got {value!r}") from None
            assert getattr(trainer, attr) > 0, f"{var} must be positive, got {value}"


@dataclass
class AuxiliaryNetwork:
    """A network trained beside ``self.network``; optimiser and schedule may be None (not trained)."""

    module: nn.Module
    optimizer: torch.optim.Optimizer | None = None
    lr_scheduler: Any = None


class SemiSupervisedTrainer(nnUNetTrainer):
    """Base class of the plugin's semi-supervised trainers (not a trainer by itself)."""

    loss_terms: tuple[str, ...] = ()
    unsupervised_rampup_fraction: float = 0.1
    grad_clip_norm: float = 12.0

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        apply_schedule_overrides(self)
        rampup = os.environ.get("nnUNet_diffcl_rampup_fraction")
        if rampup:  # an experiment's knob (docs/benchmarks.md), not a schedule: the class default stays
            try:
                self.unsupervised_rampup_fraction = float(rampup)
            except ValueError:
                raise ValueError(f"nnUNet_diffcl_rampup_fraction must be a number, got {rampup!r}") from None
            assert 0.0 <= self.unsupervised_rampup_fraction <= 1.0, \
                f"nnUNet_diffcl_rampup_fraction must lie in [0, 1], got {rampup}"
        self.logger.local_logger = TermLogger(list(self.loss_terms) + [WEIGHT_TERM])
        self.auxiliary: dict[str, AuxiliaryNetwork] = {}
        self.ssl_step = 0

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

    # ----------------------------------------------------------------------------------- helpers
    def unsupervised_weight(self) -> float:
        total = self.num_epochs * self.num_iterations_per_epoch
        length = self.unsupervised_rampup_fraction * total
        return 1.0 if length <= 0 else sigmoid_rampup(self.ssl_step / length)

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

    def _trained(self) -> list[tuple[nn.Module, torch.optim.Optimizer]]:
        pairs = [(self.network, self.optimizer)]
        return pairs + [(a.module, a.optimizer) for a in self.auxiliary.values() if a.optimizer is not None]

    # ----------------------------------------------------------------------------------- nnU-Net hooks
    def initialize(self) -> None:
        super().initialize()
        self.auxiliary = self.build_auxiliary_networks()
        if self.is_ddp:
            for aux in self.auxiliary.values():
                if aux.optimizer is not None:
                    aux.module = DDP(nn.SyncBatchNorm.convert_sync_batchnorm(aux.module),
                                     device_ids=[self.local_rank] if self.device.type == "cuda" else None)

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
        loader_u = unlabeled_loader_like(data_loader_of(train), self.dataset_class(folder, cases), self.batch_size,
                                         self.label_manager)
        augmenter_u = augmenter_for(loader_u, pin_memory=self.device.type == "cuda")
        _ = next(augmenter_u)
        self.print_to_log_file(f"Unlabeled data: {len(cases)} case(s) from {folder}, batch size {self.batch_size}")
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
        for _, optimizer in trained:
            optimizer.zero_grad(set_to_none=True)
        with autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context():
            total, terms = self.compute_losses(data, target, data_u, weight)
        self.ssl_step += 1
        logged = {k: float(v.detach()) for k, v in terms.items()}
        logged[WEIGHT_TERM] = weight
        if not torch.isfinite(total):
            self.print_to_log_file(f"WARNING: non-finite loss ({float(total.detach())}) in step {self.ssl_step}, terms "
                                   f"{logged}: step skipped, weights unchanged.")
            for _, optimizer in trained:
                optimizer.zero_grad(set_to_none=True)
            return {"loss": np.nan, **logged}
        if self.grad_scaler is not None:
            self.grad_scaler.scale(total).backward()
            for module, optimizer in trained:
                self.grad_scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(module.parameters(), self.grad_clip_norm)
            for _, optimizer in trained:
                self.grad_scaler.step(optimizer)
            self.grad_scaler.update()
        else:
            total.backward()
            for module, optimizer in trained:
                nn.utils.clip_grad_norm_(module.parameters(), self.grad_clip_norm)
                optimizer.step()
        return {"loss": float(total.detach()), **logged}

    def on_train_epoch_end(self, train_outputs: list[dict]) -> None:
        outputs = collate_outputs(train_outputs)
        skipped = int(np.sum(np.isnan(outputs["loss"])))
        if skipped:
            self.print_to_log_file(f"WARNING: {skipped} of {len(train_outputs)} steps skipped (non-finite loss)")
        for key in ["loss"] + list(self.loss_terms) + [WEIGHT_TERM]:
            values = np.asarray(outputs[key], dtype=np.float64)
            if self.is_ddp:
                gathered = [None] * dist.get_world_size()
                dist.all_gather_object(gathered, values)
                values = np.concatenate(gathered)
            mean = float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")
            self.logger.log("train_losses" if key == "loss" else TERM_PREFIX + key, mean, self.current_epoch)

    def on_epoch_end(self) -> None:
        terms = ", ".join(f"{t} {self.logger.get_value(TERM_PREFIX + t, step=-1):.4f}"
                          for t in list(self.loss_terms) + [WEIGHT_TERM])
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
        super().load_checkpoint(filename_or_checkpoint)
        for name, aux in self.auxiliary.items():
            if name not in state["networks"]:
                raise RuntimeError(f"{filename_or_checkpoint} lacks the auxiliary network '{name}'")
            self._bare(aux.module).load_state_dict(state["networks"][name])
            if aux.optimizer is not None:
                aux.optimizer.load_state_dict(state["optimizers"][name])
        self.ssl_step = int(state["ssl_step"])
        self.load_extra_checkpoint_state(state.get("extra", {}))
