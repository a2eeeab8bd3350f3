"""Memory bank (FIFO, capacity, no gradient), per-class sampling, and InfoNCE on hand-built cases."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from nnunetv2_diffcl.losses.contrastive import (
    ClassMemoryBank,
    ProjectionHead,
    all_gather_samples,
    infonce_floor,
    sample_per_class,
    supervised_infonce,
)


@pytest.mark.parametrize("conv_op,spatial", [(torch.nn.Conv2d, (5, 7)), (torch.nn.Conv3d, (3, 4, 5))])
def test_projection_head_gives_unit_embeddings(conv_op, spatial):
    head = ProjectionHead(8, embed_dim=6, conv_op=conv_op)
    out = head(torch.randn(2, 8, *spatial))
    assert out.shape == (2, 6, *spatial)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(2, *spatial))


@pytest.mark.parametrize("conv_op,spatial", [(torch.nn.Conv1d, (9,)), (torch.nn.Conv2d, (5, 7)),
                                             (torch.nn.Conv3d, (3, 4, 5))])
def test_projection_head_on_sampled_voxels_equals_sampling_the_embedded_map(conv_op, spatial):
    torch.manual_seed(0)
    head = ProjectionHead(8, embed_dim=6, conv_op=conv_op)
    features = torch.randn(2, 8, *spatial)
    labels = torch.randint(0, 3, (2, *spatial))
    mask = torch.rand(2, *spatial) > 0.3
    map_then_sample = sample_per_class(head(features), labels, mask, 4, 3, torch.Generator().manual_seed(1))
    sample_then_embed = sample_per_class(features, labels, mask, 4, 3, torch.Generator().manual_seed(1))
    assert sample_then_embed[0].shape == (sample_then_embed[1].numel(), 8)
    torch.testing.assert_close(head(sample_then_embed[0]), map_then_sample[0])
    assert torch.equal(sample_then_embed[1], map_then_sample[1])


def test_projection_head_on_no_voxels():
    assert ProjectionHead(8, embed_dim=6, conv_op=torch.nn.Conv3d)(torch.zeros(0, 8)).shape == (0, 6)


def test_projection_head_refuses_other_ops():
    with pytest.raises(TypeError, match="Conv1d, Conv2d or Conv3d"):
        ProjectionHead(8, conv_op=torch.nn.Linear)


def test_bank_is_fifo_per_class_with_capacity():
    bank = ClassMemoryBank(num_classes=2, embed_dim=1, capacity=3)
    bank.push(torch.tensor([[1.0], [2.0], [10.0]]), torch.tensor([0, 0, 1]))
    assert bank.entries(0).flatten().tolist() == [1.0, 2.0] and bank.entries(1).flatten().tolist() == [10.0]
    bank.push(torch.tensor([[3.0], [4.0]]), torch.tensor([0, 0]))
    assert bank.entries(0).flatten().tolist() == [2.0, 3.0, 4.0]  # 1.0, the oldest, was replaced
    assert bank.count.tolist() == [3, 1]
    bank.push(torch.arange(5.0, 10.0)[:, None], torch.zeros(5, dtype=torch.long))  # more than capacity at once
    assert bank.entries(0).flatten().tolist() == [7.0, 8.0, 9.0]
    bank.push(torch.tensor([[99.0]]), torch.tensor([5]))  # unknown class: ignored
    keys, labels = bank.keys()
    assert keys.flatten().tolist() == [7.0, 8.0, 9.0, 10.0] and labels.tolist() == [0, 0, 0, 1]


def test_nothing_flows_into_the_bank():
    bank = ClassMemoryBank(num_classes=1, embed_dim=2, capacity=4)
    source = torch.randn(3, 2, requires_grad=True)
    bank.push(source * 2, torch.zeros(3, dtype=torch.long))
    assert not bank.features.requires_grad and bank.features.grad_fn is None
    keys, _ = bank.keys()
    query = torch.randn(1, 2, requires_grad=True)
    supervised_infonce(query, torch.tensor([0]), keys, torch.zeros(3, dtype=torch.long)).backward()
    assert source.grad is None and query.grad is not None
    # the bank is saved and restored with the module's state_dict
    restored = ClassMemoryBank(num_classes=1, embed_dim=2, capacity=4)
    restored.load_state_dict(bank.state_dict())
    assert torch.equal(restored.entries(0), bank.entries(0))


def test_infonce_known_values():
    q = torch.tensor([[1.0, 0.0]])
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    key_labels = torch.tensor([0, 1])
    # one positive with similarity 1, one negative with similarity 0: -log(e^(1/t) / (e^(1/t) + 1))
    for t in (1.0, 0.1):
        expected = math.log(1 + math.exp(-1 / t))
        # float32: at t = 0.1 the loss (4.5e-5) sits next to logits of 10, so compare to ~1e-6
        value = supervised_infonce(q, torch.tensor([0]), keys, key_labels, t).item()
        assert value == pytest.approx(expected, rel=1e-5, abs=1e-6)
    # two positives: the mean of their -log probabilities
    keys3 = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    z = math.exp(1.0) + math.exp(0.6) + math.exp(0.0)
    expected = -(math.log(math.exp(1.0) / z) + math.log(math.exp(0.6) / z)) / 2
    loss = supervised_infonce(q, torch.tensor([0]), keys3, torch.tensor([0, 0, 1]), 1.0)
    assert loss.item() == pytest.approx(expected)


def _infonce_by_definition(queries, query_labels, keys, key_labels, temperature):
    """The loss as defined: every query's log-probabilities over all keys, averaged over its positives."""
    per_query = []
    for q, label in zip(queries, query_labels):
        positive = key_labels == label
        if positive.any():
            log_prob = torch.log_softmax(keys @ q / temperature, dim=0)
            per_query.append(-log_prob[positive].mean())
    return torch.stack(per_query).mean()


@pytest.mark.parametrize("temperature", [0.1, 1.0])
@pytest.mark.parametrize("key_labels", [[0, 0, 1, 2, 2, 2], [3, 1, 1, 3, 7, 1], [-1, 0, 0, 5, 5, 0]])
def test_infonce_matches_its_definition_in_value_and_gradient(temperature, key_labels):
    # the class-mean form (no query-by-key mask) against the per-query definition, in float64: the queries' labels
    # include classes with no key (left out) and the keys' classes with no query
    torch.manual_seed(0)
    key_labels = torch.tensor(key_labels).repeat(3)
    keys = torch.nn.functional.normalize(torch.randn(key_labels.numel(), 5, dtype=torch.float64), dim=1)
    query_labels = torch.tensor([0, 1, 3, 3, 4, 5, 7, 1])
    queries = torch.nn.functional.normalize(torch.randn(8, 5, dtype=torch.float64), dim=1).requires_grad_()
    keys.requires_grad_()
    fast = supervised_infonce(queries, query_labels, keys, key_labels, temperature)
    grads = torch.autograd.grad(fast, (queries, keys))
    slow = _infonce_by_definition(queries, query_labels, keys, key_labels, temperature)
    expected = torch.autograd.grad(slow, (queries, keys))
    assert fast.dtype == torch.float32  # computed in float32 like the trainer's embeddings under autocast
    assert fast.item() == pytest.approx(slow.item(), rel=1e-5)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)
    positives = [int((key_labels == c).sum()) for c in query_labels if (key_labels == c).any()]
    assert infonce_floor(query_labels, key_labels) == pytest.approx(sum(map(math.log, positives)) / len(positives))


def test_infonce_skips_classes_without_keys_and_never_nans():
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    alone = supervised_infonce(q[:1], torch.tensor([0]), keys, torch.tensor([0, 1]))
    mixed = supervised_infonce(q, torch.tensor([0, 2]), keys, torch.tensor([0, 1]))  # class 2 has no key
    assert mixed.item() == pytest.approx(alone.item())
    none = supervised_infonce(q, torch.tensor([2, 2]), keys, torch.tensor([0, 1]))
    empty_bank = supervised_infonce(q, torch.tensor([0, 1]), torch.zeros(0, 2), torch.zeros(0, dtype=torch.long))
    no_queries = supervised_infonce(q[:0], torch.zeros(0, dtype=torch.long), keys, torch.tensor([0, 1]))
    for value in (none, empty_bank, no_queries):
        assert value.item() == 0.0 and value.requires_grad
    none.backward()
    assert torch.equal(q.grad, torch.zeros_like(q))


def test_sample_per_class_is_bounded_and_respects_the_mask():
    labels = torch.zeros(2, 4, 4, dtype=torch.long)
    labels[:, :2] = 1
    mask = torch.ones_like(labels, dtype=torch.bool)
    mask[1] = False
    # each voxel's embedding encodes its own flat index, to check labels travel with embeddings
    index = torch.arange(32, dtype=torch.float32).reshape(2, 4, 4)
    embeddings = torch.stack([index, -index], dim=1)
    samples, sample_labels = sample_per_class(embeddings, labels, mask, max_per_class=3, num_classes=3,
                                              generator=torch.Generator().manual_seed(0))
    assert sample_labels.tolist().count(0) == 3 and sample_labels.tolist().count(1) == 3
    flat = labels.reshape(-1)
    for emb, lab in zip(samples, sample_labels):
        i = int(emb[0])
        assert i < 16 and flat[i] == lab and emb[1] == -emb[0]


def _gather_worker(rank: int, world: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    n = rank + 1  # ranks contribute different numbers of samples
    emb, lab = all_gather_samples(torch.full((n, 2), float(rank)), torch.full((n,), rank, dtype=torch.long))
    queue.put((rank, emb.tolist(), lab.tolist()))
    torch.distributed.destroy_process_group()


def test_samples_are_gathered_across_ranks():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    processes = [ctx.Process(target=_gather_worker, args=(r, 2, port, queue)) for r in range(2)]
    for p in processes:
        p.start()
    results = sorted(queue.get(timeout=120) for _ in processes)
    for p in processes:
        p.join(timeout=60)
    for _, emb, lab in results:
        assert lab == [0, 1, 1] and emb == [[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]
