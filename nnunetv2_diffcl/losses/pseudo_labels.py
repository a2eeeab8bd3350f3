"""Hard pseudo-labels in the form nnU-Net's losses take as targets."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def full_resolution(outputs: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """The highest-resolution output of a network (deep supervision gives a list, highest first)."""
    return outputs if isinstance(outputs, torch.Tensor) else outputs[0]


@torch.no_grad()
def hard_pseudo_label(logits: torch.Tensor, has_regions: bool) -> torch.Tensor:
    """Argmax label map (B, 1, ...) for softmax training; thresholded region maps for region training."""
    if has_regions:
        return (torch.sigmoid(logits.float()) > 0.5).to(logits.dtype)
    return logits.argmax(1, keepdim=True).to(torch.int16)


@torch.no_grad()
def targets_like(label: torch.Tensor, outputs: torch.Tensor | Sequence[torch.Tensor]
                 ) -> torch.Tensor | list[torch.Tensor]:
    """A full-resolution label shaped as the target of ``outputs`` (one tensor or one per DS output).

    Lower resolutions are nearest-neighbour downsamplings ('nearest-exact'), as nnU-Net makes its own
    deep-supervision targets from the ground truth.
    """
    if isinstance(outputs, torch.Tensor):
        return label
    return [label] + [F.interpolate(label.float(), size=out.shape[2:], mode="nearest-exact").to(label.dtype)
                      for out in outputs[1:]]


@torch.no_grad()
def pseudo_label_targets(outputs: torch.Tensor | Sequence[torch.Tensor], has_regions: bool
                         ) -> torch.Tensor | list[torch.Tensor]:
    """Hard pseudo-label of the highest-resolution output, as targets for ``outputs``' structure."""
    return targets_like(hard_pseudo_label(full_resolution(outputs), has_regions), outputs)


def split_batch(outputs: torch.Tensor | Sequence[torch.Tensor], n_first: int):
    """Split a forward pass over ``cat([a, b])`` back into the outputs for a and for b."""
    if isinstance(outputs, torch.Tensor):
        return outputs[:n_first], outputs[n_first:]
    return [o[:n_first] for o in outputs], [o[n_first:] for o in outputs]


@torch.no_grad()
def label_and_confidence(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Argmax label (B, 1, ...) as int16 and the teacher's probability of it (B, 1, ...), for softmax outputs."""
    probabilities = torch.softmax(logits.float(), dim=1)
    confidence, label = probabilities.max(dim=1, keepdim=True)
    return label.to(torch.int16), confidence


@torch.no_grad()
def masked_pseudo_label(label: torch.Tensor, keep: torch.Tensor, ignore_value: int) -> torch.Tensor:
    """``label`` with ``ignore_value`` wherever ``keep`` is False: those voxels leave the loss entirely
    (nnU-Net's ignore-label mechanism), rather than being taught as background."""
    return torch.where(keep, label, torch.full_like(label, ignore_value))


def random_boxes(batch: int, spatial: tuple[int, ...], fraction: float, device: torch.device,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """One axis-aligned box per sample, ``fraction`` of the patch along every axis, at a random place:
    a bool mask (B, 1, *spatial), True inside the box."""
    mask = torch.zeros((batch, 1, *spatial), dtype=torch.bool, device=device)
    for b in range(batch):
        index: list[slice] = []
        for size in spatial:
            side = max(1, int(round(fraction * size)))
            start = int(torch.randint(0, size - side + 1, (1,), generator=generator))
            index.append(slice(start, start + side))
        mask[(b, 0, *index)] = True
    return mask


@torch.no_grad()
def copy_paste(into: torch.Tensor, source: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    """``into`` with ``source`` pasted inside ``box`` (B, 1, *spatial; broadcast over channels).

    Images and their (pseudo-)labels are pasted with the same box, so every pasted voxel keeps its label.
    """
    if into.shape[0] != source.shape[0] or into.shape[2:] != source.shape[2:]:
        raise ValueError(f"copy_paste needs matching batch and spatial shapes, got {tuple(into.shape)} and "
                         f"{tuple(source.shape)}")
    return torch.where(box, source.to(into.dtype), into)


@torch.no_grad()
def class_dice(a: torch.Tensor, b: torch.Tensor, num_classes: int) -> list[float]:
    """Hard Dice between two label maps for each foreground class 1..K-1; NaN for a class absent from both."""
    scores = []
    for c in range(1, num_classes):
        in_a, in_b = a == c, b == c
        total = int(in_a.sum()) + int(in_b.sum())
        scores.append(2.0 * int((in_a & in_b).sum()) / total if total else float("nan"))
    return scores


def foreground_dice(a: torch.Tensor, b: torch.Tensor, num_classes: int) -> float:
    """Mean over foreground classes of the hard Dice between two label maps; classes absent from both are left
    out, and NaN when every class is absent (nothing to measure)."""
    scores = [d for d in class_dice(a, b, num_classes) if d == d]
    return float(sum(scores) / len(scores)) if scores else float("nan")


@torch.no_grad()
def rare_class_first(labels: torch.Tensor, n: int, forced: int, num_classes: int,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Indices of ``n`` of the patches of ``labels`` (P, 1, ...; a teacher's label maps): first the ``forced``
    patches with the most voxels of the rarest foreground class in all of them (only patches that hold it), then
    patches drawn at random from the rest. nnU-Net oversamples foreground this way for labeled patches; for
    unlabeled ones the teacher's label stands in for the ground truth."""
    patches = labels.shape[0]
    if not 0 <= forced <= n <= patches:
        raise ValueError(f"rare_class_first needs 0 <= forced ({forced}) <= n ({n}) <= patches ({patches})")
    flat = labels.reshape(patches, -1).long()
    counts = torch.stack([(flat == c).sum(1) for c in range(1, num_classes)], 1)  # (P, K - 1)
    totals = counts.sum(0)
    chosen: list[int] = []
    if forced and bool((totals > 0).any()):
        rare = int(torch.where(totals > 0, totals, totals.max() + 1).argmin())
        ranked = torch.argsort(counts[:, rare], descending=True, stable=True)
        chosen = [int(i) for i in ranked[:forced] if counts[i, rare] > 0]
    rest = [int(i) for i in torch.randperm(patches, generator=generator) if int(i) not in chosen]
    return torch.tensor(chosen + rest[: n - len(chosen)], dtype=torch.long, device=labels.device)
