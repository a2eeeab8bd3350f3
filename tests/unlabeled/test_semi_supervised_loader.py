"""The unlabeled loader: nnU-Net's patch sizes and transforms, patches drawn uniformly whatever the labels."""

from __future__ import annotations

import torch

from nnunetv2_diffcl.unlabeled.preprocessing import unlabeled_folder
from nnunetv2_diffcl.unlabeled.semi_supervised_loader import data_loader_of, unlabeled_loader_like
from tests.trainers.test_cps_trainer import make_trainer


def test_unlabeled_patches_of_a_dataset_with_an_ignore_label(dataset_copy, in_process_env):
    # nnU-Net centres each patch of an ignore-label dataset on annotated voxels (a class_locations key that
    # preprocessed unlabeled cases do not have): the unlabeled loader must draw its patches uniformly instead
    in_process_env(dataset_copy)
    torch.manual_seed(0)
    trainer = make_trainer(dataset_copy)
    labels = dict(trainer.dataset_json["labels"])
    with_ignore = trainer.plans_manager.get_label_manager(
        {**trainer.dataset_json, "labels": {**labels, "ignore": max(labels.values()) + 1}})
    assert with_ignore.has_ignore_label
    train, val = trainer.get_dataloaders()
    try:
        folder = unlabeled_folder(trainer.preprocessed_dataset_folder_base,
                                  trainer.configuration_manager.data_identifier)
        dataset = trainer.dataset_class(folder)
        loader = unlabeled_loader_like(data_loader_of(train.labeled), dataset, 2, with_ignore)
        for _ in range(3):
            batch = loader.generate_train_batch()
            assert batch["data"].shape[0] == 2
            assert tuple(batch["data"].shape[2:]) == tuple(trainer.configuration_manager.patch_size)
    finally:
        train._finish()
        if hasattr(val, "_finish"):
            val._finish()
