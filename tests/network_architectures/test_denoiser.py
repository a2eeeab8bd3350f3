"""The diffusion segmentation branch (DS): nnU-Net's planned U-Net, time-conditioned by FiLM.

Plans are hand-written in the layout nnU-Net's ExperimentPlanner produces, with 3-stage networks
(features 8/16/32) and tiny patches (32^2, 16^3) so everything runs in seconds on a CPU.
"""

from __future__ import annotations

import math

import pytest
import torch
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager

from nnunetv2_diffcl.diffusion import DDIMSampler, NoiseSchedule
from nnunetv2_diffcl.network_architectures.denoiser import (
    FiLM,
    SinusoidalTimestepEmbedding,
    TimeConditionedDenoiser,
    build_denoiser,
)
from tests.network_architectures.plans import PLAIN, RESENC
from tests.network_architectures.plans import make_configuration as make_configuration_for
from tests.network_architectures.plans import make_plans as plans_with

NUM_CLASSES = 3
IMAGE_CHANNELS = 2
FEATURES = [8, 16, 32]
def make_configuration(dim: int, arch: str) -> dict:
    """A 3-stage planned configuration: 2D 32^2 or 3D 16^3."""
    patch = [32, 32] if dim == 2 else [16, 16, 16]
    return make_configuration_for(dim, arch, FEATURES, patch, IMAGE_CHANNELS, blocks_per_stage=[1, 2, 2])


def managers(dim: int, arch: str = PLAIN) -> tuple[PlansManager, ConfigurationManager]:
    pm = PlansManager(plans_with({"2d": make_configuration(2, arch), "3d_fullres": make_configuration(3, arch)}))
    return pm, pm.get_configuration("3d_fullres" if dim == 3 else "2d")


def build(
    dim: int, arch: str = PLAIN, deep_supervision: bool = True, seed: int = 0, **kwargs: object
) -> TimeConditionedDenoiser:
    torch.manual_seed(seed)
    pm, cm = managers(dim, arch)
    return build_denoiser(pm, cm, IMAGE_CHANNELS, NUM_CLASSES, enable_deep_supervision=deep_supervision, **kwargs)


def patch(dim: int) -> list[int]:
    return list(managers(dim)[1].patch_size)


def inputs(dim: int, batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(batch, IMAGE_CHANNELS, *patch(dim), generator=g)
    x_t = torch.randn(batch, NUM_CLASSES, *patch(dim), generator=g)
    return image, x_t


def expected_shapes(dim: int, batch: int = 2) -> list[tuple[int, ...]]:
    """Deep supervision: full resolution first, then halving, one output per decoder stage."""
    return [(batch, NUM_CLASSES, *(s // 2**i for s in patch(dim))) for i in range(len(FEATURES) - 1)]


def perturb_film(net: TimeConditionedDenoiser, seed: int = 0, std: float = 0.5) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for film in net.film:
            film.proj.weight.copy_(torch.randn(film.proj.weight.shape, generator=g) * std)
            film.proj.bias.copy_(torch.randn(film.proj.bias.shape, generator=g) * std)


CASES = [(2, PLAIN), (3, PLAIN), (2, RESENC), (3, RESENC)]
IDS = ["2d-plain", "3d-plain", "2d-resenc", "3d-resenc"]


# ----------------------------------------------------------------------------------------------- time embedding
@pytest.mark.parametrize("dim", [2, 8, 32])
def test_sinusoidal_embedding(dim: int) -> None:
    emb = SinusoidalTimestepEmbedding(dim)
    t = torch.tensor([0, 1, 500, 999])
    out = emb(t)
    assert out.shape == (4, dim) and out.dtype == torch.float32
    torch.testing.assert_close(out[0], torch.cat([torch.zeros(dim // 2), torch.ones(dim // 2)]))  # sin 0, cos 0
    torch.testing.assert_close(out.square().reshape(4, 2, dim // 2).sum(1), torch.ones(4, dim // 2))  # sin^2+cos^2
    assert out[1, 0].item() == pytest.approx(math.sin(1.0), abs=1e-6)  # highest frequency is 1
    assert len({tuple(row.tolist()) for row in out}) == 4  # distinct timesteps, distinct embeddings


@pytest.mark.parametrize("dim", [0, 3])
def test_sinusoidal_embedding_needs_even_dim(dim: int) -> None:
    with pytest.raises(ValueError, match="even"):
        SinusoidalTimestepEmbedding(dim)


@pytest.mark.parametrize("spatial", [(4, 4), (2, 3, 4)], ids=["2d", "3d"])
def test_film_identity_at_init_and_broadcast(spatial: tuple[int, ...]) -> None:
    film = FiLM(embed_dim=6, channels=5)
    x, emb = torch.randn(2, 5, *spatial), torch.randn(2, 6)
    torch.testing.assert_close(film(x, emb), x, rtol=0, atol=0)
    with torch.no_grad():
        film.proj.bias[:5] = 1.0  # scale = 1 -> x * 2
        film.proj.bias[5:] = torch.arange(5.0)  # per-channel shift
    shift = torch.arange(5.0).reshape(1, 5, *[1] * len(spatial))
    torch.testing.assert_close(film(x, emb), 2 * x + shift)


# ----------------------------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("dim, arch", CASES, ids=IDS)
def test_outputs_with_and_without_deep_supervision(dim: int, arch: str) -> None:
    net = build(dim, arch)
    assert net.image_channels == IMAGE_CHANNELS and net.num_classes == NUM_CLASSES
    assert len(net.film) == len(FEATURES) and [f.channels for f in net.film] == FEATURES
    image, x_t = inputs(dim)
    t = torch.tensor([0, 999])
    with torch.no_grad():
        out = net(image, x_t, t)
        assert isinstance(out, list) and [tuple(o.shape) for o in out] == expected_shapes(dim)
        net.decoder.deep_supervision = False  # what nnUNetTrainer.set_deep_supervision_enabled does
        single = net(image, x_t, t)
    assert isinstance(single, torch.Tensor) and tuple(single.shape) == expected_shapes(dim)[0]
    assert single.dtype == torch.float32
    torch.testing.assert_close(single, out[0])


@pytest.mark.parametrize("dim, arch", [(2, PLAIN), (3, RESENC)], ids=["2d-plain", "3d-resenc"])
def test_built_without_deep_supervision(dim: int, arch: str) -> None:
    net = build(dim, arch, deep_supervision=False)
    image, x_t = inputs(dim, batch=1)
    with torch.no_grad():
        out = net(image, x_t, torch.tensor([3]))
    assert isinstance(out, torch.Tensor) and tuple(out.shape) == expected_shapes(dim, batch=1)[0]


def test_scalar_timestep_is_broadcast() -> None:
    net = build(2, deep_supervision=False)
    perturb_film(net)
    image, x_t = inputs(2)
    with torch.no_grad():
        torch.testing.assert_close(net(image, x_t, torch.tensor(7)), net(image, x_t, torch.tensor([7, 7])))


def test_wrong_channel_counts_raise() -> None:
    net = build(2)
    image, x_t = inputs(2)
    with pytest.raises(ValueError, match="label channels"):
        net(image, x_t[:, :2], torch.tensor([1, 1]))


def test_not_a_unet_raises() -> None:
    with pytest.raises(TypeError, match="encoder/decoder"):
        TimeConditionedDenoiser(torch.nn.Conv2d(1, 1, 1), 1, 1)


# ----------------------------------------------------------------------------------------------- time conditioning
@pytest.mark.parametrize("dim, arch", CASES, ids=IDS)
def test_zero_film_is_identity_equals_planned_network(dim: int, arch: str) -> None:
    """At init the output ignores t and equals nnU-Net's own network on the concatenated input."""
    net = build(dim, arch, seed=4).eval()
    _, cm = managers(dim, arch)
    torch.manual_seed(4)  # same seed: nnU-Net's build draws the same planned weights
    planned = get_network_from_plans(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                     cm.network_arch_init_kwargs_req_import, IMAGE_CHANNELS + NUM_CLASSES,
                                     NUM_CLASSES, allow_init=True, deep_supervision=True).eval()
    image, x_t = inputs(dim)
    with torch.no_grad():
        a = net(image, x_t, torch.tensor([0, 0]))
        b = net(image, x_t, torch.tensor([999, 500]))
        reference = planned(torch.cat([image, x_t], 1))
    for x, y, r in zip(a, b, reference):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
        torch.testing.assert_close(x, r, rtol=0, atol=0)


@pytest.mark.parametrize("dim, arch", CASES, ids=IDS)
def test_perturbed_film_depends_on_t(dim: int, arch: str) -> None:
    net = build(dim, arch, deep_supervision=False).eval()
    perturb_film(net)
    image, x_t = inputs(dim)
    with torch.no_grad():
        a = net(image, x_t, torch.tensor([0, 0]))
        b = net(image, x_t, torch.tensor([999, 500]))
        a_again = net(image, x_t, torch.tensor([0, 0]))
    assert (a - b).abs().max() > 1e-3
    torch.testing.assert_close(a, a_again, rtol=0, atol=0)


def test_gradients_reach_film_and_time_mlp() -> None:
    net = build(3, RESENC)
    image, x_t = inputs(3)
    t = torch.tensor([10, 900])
    sum(o.square().mean() for o in net(image, x_t, t)).backward()
    # zero-initialised FiLM: its own weights get gradients at once
    assert all(f.proj.weight.grad is not None and f.proj.weight.grad.abs().sum() > 0 for f in net.film)
    # the time MLP sits behind the zero FiLM weights: connected (grad exists), but zero until FiLM moves
    assert all(p.grad is not None for p in net.time_embed.parameters())
    net.zero_grad(set_to_none=True)
    perturb_film(net, std=0.05)
    sum(o.square().mean() for o in net(image, x_t, t)).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.time_embed.parameters())
    assert all(p.grad is not None for p in net.encoder.parameters())


def test_one_training_step_moves_film_off_identity() -> None:
    net = build(2, deep_supervision=False)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    image, x_t = inputs(2)
    target = torch.randint(0, NUM_CLASSES, (2, *patch(2)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = torch.nn.functional.cross_entropy(net(image, x_t, torch.tensor([5, 600])).float(), target)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert any(f.proj.weight.abs().sum() > 0 for f in net.film)


# ----------------------------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("dim, arch", CASES, ids=IDS)
def test_state_dict_round_trip(dim: int, arch: str) -> None:
    a = build(dim, arch, seed=1)
    perturb_film(a)  # so the FiLM / time-MLP weights matter for the comparison
    b = build(dim, arch, seed=2, deep_supervision=False)
    keys = list(a.state_dict())
    assert keys == list(b.state_dict())
    assert any(k.startswith("film.") for k in keys) and any(k.startswith("time_embed.") for k in keys)
    assert any(k.startswith("encoder.") for k in keys) and any(k.startswith("decoder.") for k in keys)
    b.load_state_dict(a.state_dict(), strict=True)
    a.eval()
    b.eval()
    a.decoder.deep_supervision = False
    image, x_t = inputs(dim)
    t = torch.tensor([17, 423])
    with torch.no_grad():
        torch.testing.assert_close(b(image, x_t, t), a(image, x_t, t), rtol=0, atol=0)


def test_embed_dim_default_and_override() -> None:
    assert build(2).embed_dim == 4 * FEATURES[0]
    net = build(2, embed_dim=24)
    assert net.embed_dim == 24 and net.film[0].proj.in_features == 24
    with pytest.raises(RuntimeError, match="size mismatch"):
        build(2).load_state_dict(net.state_dict(), strict=True)


def test_conv_feature_map_size_matches_planned_network() -> None:
    _, cm = managers(3)
    planned = get_network_from_plans(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                     cm.network_arch_init_kwargs_req_import, IMAGE_CHANNELS + NUM_CLASSES,
                                     NUM_CLASSES, deep_supervision=True)
    assert build(3).compute_conv_feature_map_size(patch(3)) == planned.compute_conv_feature_map_size(patch(3))


def test_ddim_with_denoiser() -> None:
    """The denoiser plugs into the DDIM sampler as is (deep supervision list -> first element)."""
    net = build(2).eval()
    perturb_film(net)
    image, _ = inputs(2, batch=1)
    sampler = DDIMSampler(NoiseSchedule(1000, "cosine"), num_steps=3)
    a = sampler.sample(net, image, NUM_CLASSES, generator=torch.Generator().manual_seed(0))
    b = sampler.sample(net, image, NUM_CLASSES, generator=torch.Generator().manual_seed(0))
    assert a.shape == (1, NUM_CLASSES, *patch(2)) and not a.requires_grad
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert all(p.grad is None for p in net.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_forward_backward() -> None:
    net = build(3, RESENC).cuda()
    perturb_film(net)
    image, x_t = (x.cuda() for x in inputs(3))
    with torch.autocast("cuda", dtype=torch.float16):
        out = net(image, x_t, torch.tensor([1, 2], device="cuda"))
    sum(o.float().mean() for o in out).backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)
