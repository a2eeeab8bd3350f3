"""Contrastive label propagation: projection head, per-class memory bank, supervised InfoNCE.

Labeled voxels that the CNN predicts correctly fill a per-class FIFO memory bank of embeddings.
Unlabeled voxels, labelled by the diffusion branch's pseudo-label where both branches agree, are
pulled toward the bank entries of their class and pushed from the others' (supervised InfoNCE,
Khosla et al. 2020, with the bank as the set of keys). Nothing flows into the bank: entries are
detached copies. Classes absent from a batch or from the bank are skipped, never a NaN.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


class ProjectionHead(nn.Module):
    """1x1 convolutions from decoder features to L2-normalised embeddings, for any dimensionality.

    Takes a feature map (B, C, *spatial) or single voxels' features (N, C): the head works voxel by voxel, so
    embedding sampled voxels gives what sampling the embedded map gives, at a fraction of the work.
    """

    def __init__(self, in_channels: int, embed_dim: int = 64, conv_op: type[nn.Module] = nn.Conv3d,
                 hidden_channels: int | None = None) -> None:
        super().__init__()
        dims = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}
        if conv_op not in dims:
            raise TypeError(f"conv_op must be torch's Conv1d, Conv2d or Conv3d, got {conv_op}")
        self.spatial_dims = dims[conv_op]
        hidden = hidden_channels or in_channels
        self.net = nn.Sequential(conv_op(in_channels, hidden, 1), nn.LeakyReLU(inplace=True),
                                 conv_op(hidden, embed_dim, 1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.ndim == 2:  # (N, C) voxels: a 1x1 convolution of N one-voxel maps
            voxels = features.reshape(*features.shape, *([1] * self.spatial_dims))
            return F.normalize(self.net(voxels), dim=1).flatten(1)
        return F.normalize(self.net(features), dim=1)


class ClassMemoryBank(nn.Module):
    """A FIFO ring buffer of ``capacity`` embeddings per class, kept as buffers (saved in state_dict)."""

    def __init__(self, num_classes: int, embed_dim: int, capacity: int = 2048) -> None:
        super().__init__()
        if min(num_classes, embed_dim, capacity) < 1:
            raise ValueError(f"the bank's sizes must be positive: {num_classes} classes, embedding dim {embed_dim}, "
                             f"capacity {capacity}")
        self.register_buffer("features", torch.zeros(num_classes, capacity, embed_dim))
        self.register_buffer("pointer", torch.zeros(num_classes, dtype=torch.long))
        self.register_buffer("count", torch.zeros(num_classes, dtype=torch.long))

    @property
    def num_classes(self) -> int:
        return self.features.shape[0]

    @property
    def capacity(self) -> int:
        return self.features.shape[1]

    @torch.no_grad()
    def push(self, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
        """Append (N, D) embeddings with (N,) class labels; the oldest entries of a full class are replaced."""
        embeddings = embeddings.detach().to(self.features.dtype)
        for c in labels.unique().tolist():
            if not 0 <= c < self.num_classes:
                continue
            new = embeddings[labels == c][-self.capacity:]
            n = new.shape[0]
            slots = (self.pointer[c] + torch.arange(n, device=new.device)) % self.capacity
            self.features[c, slots] = new
            self.pointer[c] = (self.pointer[c] + n) % self.capacity
            self.count[c] = torch.clamp(self.count[c] + n, max=self.capacity)

    def entries(self, c: int) -> torch.Tensor:
        """The stored embeddings of class ``c``, oldest first."""
        n = int(self.count[c])
        if n < self.capacity:
            return self.features[c, :n]
        p = int(self.pointer[c])
        return torch.cat([self.features[c, p:], self.features[c, :p]])

    def keys(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All stored embeddings (M, D) with their class labels (M,)."""
        parts = [self.entries(c) for c in range(self.num_classes)]
        labels = [torch.full((p.shape[0],), c, dtype=torch.long, device=p.device) for c, p in enumerate(parts)]
        return torch.cat(parts), torch.cat(labels)


def sample_per_class(embeddings: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, max_per_class: int,
                     num_classes: int, generator: torch.Generator | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """At most ``max_per_class`` random voxels of each class where ``mask`` holds.

    embeddings (B, D, *spatial), labels and mask (B, *spatial); returns (N, D) and (N,).
    """
    dim = embeddings.shape[1]
    flat = embeddings.movedim(1, -1).reshape(-1, dim)
    labels = labels.reshape(-1)
    mask = mask.reshape(-1)
    chosen = []
    for c in range(num_classes):
        index = torch.nonzero(mask & (labels == c), as_tuple=False).squeeze(1)
        if index.numel() > max_per_class:
            order = torch.randperm(index.numel(), generator=generator, device="cpu").to(index.device)
            index = index[order[:max_per_class]]
        chosen.append(index)
    index = torch.cat(chosen)
    return flat[index], labels[index]


def _key_classes(query_labels: torch.Tensor, key_labels: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(each key's class index, each class's key count, each query's class index, whether the query's class has a
    key): the classes are the distinct key labels, so any integer labels work (a query of another class has none)."""
    classes, key_class = torch.unique(key_labels, return_inverse=True)
    counts = torch.bincount(key_class, minlength=classes.numel())
    where = torch.searchsorted(classes, query_labels).clamp(max=classes.numel() - 1)
    return key_class, counts, where, classes[where] == query_labels


def supervised_infonce(queries: torch.Tensor, query_labels: torch.Tensor, keys: torch.Tensor,
                       key_labels: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Mean over queries of -mean over positives log(exp(q.k+/tau) / sum over all keys exp(q.k/tau)).

    Computed as logsumexp_k(q.k / tau) - q.(mean of the query's class keys) / tau, the same value: the mean over
    positives of q.k+ is q times the mean of the positives, so no query-by-key mask of positives is built (at
    256 queries and 2048 keys per class this is most of the term's cost). Queries whose class has no key are
    left out; with none left the loss is a zero that still belongs to the graph (so DDP sees every parameter used).
    """
    zero = queries.sum() * 0.0
    if queries.numel() == 0 or keys.numel() == 0:
        return zero
    key_class, counts, query_class, has_positive = _key_classes(query_labels, key_labels)
    if not has_positive.any():
        return zero
    q = queries[has_positive].float() / temperature  # scaled before the product: one pass less over queries x keys
    k = keys.float()
    class_means = k.new_zeros(counts.numel(), k.shape[1]).index_add_(0, key_class, k) / counts[:, None]
    lse = torch.logsumexp(q @ k.t(), dim=1)
    return (lse - (q * class_means[query_class[has_positive]]).sum(1)).mean()


@torch.no_grad()
def infonce_floor(query_labels: torch.Tensor, key_labels: torch.Tensor) -> float:
    """The smallest value ``supervised_infonce`` can take for these labels: mean over queries (with a positive)
    of ln(number of positives). -mean over positives of log p is smallest when all of a query's probability
    lies on its P positives, equally (p = 1/P): then it is ln P. The loss minus this floor is what is left to
    learn; NaN when no query has a positive."""
    if query_labels.numel() == 0 or key_labels.numel() == 0:
        return float("nan")
    _, counts, query_class, has_positive = _key_classes(query_labels, key_labels)
    positives = counts[query_class[has_positive]]
    return float(positives.double().log().mean()) if positives.numel() else float("nan")


def all_gather_samples(embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples of every rank (for the shared memory bank under DDP); identity without DDP."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return embeddings, labels
    world = dist.get_world_size()
    size = torch.tensor([embeddings.shape[0]], device=embeddings.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros(longest, embeddings.shape[1], device=embeddings.device, dtype=embeddings.dtype)
    padded[: embeddings.shape[0]] = embeddings.detach()
    padded_labels = torch.full((longest,), -1, device=labels.device, dtype=labels.dtype)
    padded_labels[: labels.shape[0]] = labels
    gathered = [torch.zeros_like(padded) for _ in range(world)]
    gathered_labels = [torch.zeros_like(padded_labels) for _ in range(world)]
    dist.all_gather(gathered, padded)
    dist.all_gather(gathered_labels, padded_labels)
    all_labels = torch.cat(gathered_labels)
    keep = all_labels >= 0
    return torch.cat(gathered)[keep], all_labels[keep]

