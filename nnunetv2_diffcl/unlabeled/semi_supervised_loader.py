"""Labeled + unlabeled batches from nnU-Net's own data loader and augmentation.

nnU-Net's ``run_training`` calls ``train_step(next(self.dataloader_train))``. To keep that loop
unchanged, the trainer's training loader is a :class:`SemiSupervisedBatches`: each ``next`` returns
nnU-Net's labeled batch dict with one more key, ``"unlabeled"``, holding a batch drawn from the
unlabeled folder through the same data loader class and the same transforms object.
"""

from __future__ import annotations

import contextlib
import io
from typing import Any

from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from nnunetv2.training.dataloading.nnunet_dataset import nnUNetBaseDataset
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA

UNLABELED_KEY = "unlabeled"


def data_loader_of(augmenter: Any) -> nnUNetDataLoader:
    """The nnUNetDataLoader behind one of batchgenerators' augmenters."""
    loader = getattr(augmenter, "generator", None) or getattr(augmenter, "data_loader", None)
    if not isinstance(loader, nnUNetDataLoader):
        raise TypeError(f"expected an nnUNetDataLoader behind {type(augmenter).__name__}, found "
                        f"{type(loader).__name__}")
    return loader


def unlabeled_loader_like(labeled: nnUNetDataLoader, dataset: nnUNetBaseDataset, batch_size: int,
                          label_manager: Any) -> nnUNetDataLoader:
    """A loader over ``dataset`` with the labeled loader's patch sizes and transforms, no oversampling.

    Foreground oversampling needs labels; unlabeled patches are drawn uniformly.
    """
    strip = 1 if labeled.patch_size_was_2d else 0
    loader = nnUNetDataLoader(dataset, batch_size, tuple(labeled.patch_size[strip:]),
                              tuple(labeled.final_patch_size[strip:]), label_manager,
                              oversample_foreground_percent=0.0, sampling_probabilities=None, pad_sides=None,
                              transforms=labeled.transforms)
    # with an ignore label nnU-Net centres every patch on annotated voxels, which an unlabeled case has none of
    loader.has_ignore = False
    return loader


def augmenter_for(loader: nnUNetDataLoader, pin_memory: bool) -> Any:
    """Worker processes as nnU-Net uses them for its training loader (``nnUNet_n_proc_DA``)."""
    num_processes = get_allowed_n_proc_DA()
    if num_processes == 0:
        return SingleThreadedAugmenter(loader, None)
    return NonDetMultiThreadedAugmenter(data_loader=loader, transform=None, num_processes=num_processes,
                                        num_cached=max(6, num_processes // 2), seeds=None, pin_memory=pin_memory,
                                        wait_time=0.002)


def shut_down(augmenter: Any) -> None:
    """Stop an augmenter's worker processes (quietly, as nnU-Net does for its own)."""
    finish = getattr(augmenter, "_finish", None)
    if finish is not None:
        with contextlib.redirect_stdout(io.StringIO()):
            finish()


class SemiSupervisedBatches:
    """Iterator of labeled batches, each carrying an unlabeled batch under ``"unlabeled"``."""

    def __init__(self, labeled: Any, unlabeled: Any) -> None:
        self.labeled = labeled
        self.unlabeled = unlabeled

    def __iter__(self) -> SemiSupervisedBatches:
        return self

    def __next__(self) -> dict:
        batch = next(self.labeled)
        batch[UNLABELED_KEY] = next(self.unlabeled)
        return batch

    def _finish(self) -> None:
        """Same name as batchgenerators' augmenters, so code that shuts those down handles this too."""
        shut_down(self.labeled)
        shut_down(self.unlabeled)
