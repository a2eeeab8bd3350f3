"""The CNN branch: nnU-Net's planned U-Net (2D/3D, PlainConvUNet/ResidualEncoderUNet) + HF-Mamba.

Plans are written by hand in the layout nnU-Net's ExperimentPlanner produces (small patch sizes so
everything runs in seconds on a CPU) and read through nnU-Net's own PlansManager.
"""

from __future__ import annotations

import copy

import pytest
import torch
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager

from nnunetv2_diffcl.network_architectures.cnn_branch import HFMambaUNet, build_hf_mamba_network
from nnunetv2_diffcl.network_architectures.hf_mamba import HFMamba
from tests.network_architectures.plans import PLAIN, RESENC
from tests.network_architectures.plans import make_configuration as make_configuration_for
from tests.network_architectures.plans import make_plans as plans_with

DATASET_JSON = {
    "channel_names": {"0": "MRI"},
    "labels": {"background": 0, "left_atrium": 1, "other": 2},
    "numTraining": 4,
    "file_ending": ".nii.gz",
}
NUM_CLASSES = 3
def make_configuration(dim: int, arch: str = PLAIN) -> dict:
    """A planned configuration as nnU-Net writes it: 3D 32^3 (4 stages), 2D 64^2 (5 stages)."""
    if dim == 3:
        return make_configuration_for(3, arch, [8, 16, 32, 48], [32, 32, 32], blocks_per_stage=[1, 2, 2, 2])
    return make_configuration_for(2, arch, [8, 16, 32, 48, 48], [64, 64], blocks_per_stage=[1, 2, 2, 2, 2])


def make_plans(arch: str = PLAIN) -> dict:
    """Plans with a 2d and a 3d_fullres configuration of the given architecture."""
    return plans_with({"2d": make_configuration(2, arch), "3d_fullres": make_configuration(3, arch)}, {
        "0": {"max": 5.0, "mean": 0.0, "median": 0.0, "min": -5.0, "percentile_00_5": -3.0,
              "percentile_99_5": 3.0, "std": 1.0}})


def managers(dim: int, arch: str = PLAIN) -> tuple[PlansManager, ConfigurationManager]:
    pm = PlansManager(make_plans(arch))
    return pm, pm.get_configuration("3d_fullres" if dim == 3 else "2d")


def build(dim: int, arch: str = PLAIN, deep_supervision: bool = True, stages: int = 1, seed: int = 0,
          **kwargs: object) -> HFMambaUNet:
    torch.manual_seed(seed)
    pm, cm = managers(dim, arch)
    return build_hf_mamba_network(pm, cm, 1, NUM_CLASSES, enable_deep_supervision=deep_supervision,
                                  hf_mamba_stages=stages, **kwargs)


def plain(dim: int, arch: str = PLAIN, deep_supervision: bool = True, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    _, cm = managers(dim, arch)
    return get_network_from_plans(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                  cm.network_arch_init_kwargs_req_import, 1, NUM_CLASSES,
                                  allow_init=True, deep_supervision=deep_supervision)


def patch(dim: int) -> list[int]:
    return managers(dim)[1].patch_size


def expected_shapes(dim: int, batch: int = 1) -> list[tuple]:
    """Deep supervision outputs: full resolution first, halving down to one stage above the bottleneck."""
    p = patch(dim)
    n_stages = managers(dim)[1].network_arch_init_kwargs["n_stages"]
    return [(batch, NUM_CLASSES, *(s // 2**i for s in p)) for i in range(n_stages - 1)]


CASES = [(2, PLAIN), (3, PLAIN), (2, RESENC), (3, RESENC)]
IDS = ["2d-plain", "3d-plain", "2d-resenc", "3d-resenc"]


@pytest.mark.parametrize("dim, arch", CASES, ids=IDS)
@pytest.mark.parametrize("stages", [0, 1, 2])
def test_outputs_with_and_without_deep_supervision(dim: int, arch: str, stages: int) -> None:
    net = build(dim, arch, stages=stages)
    assert len(net.hf_mamba) == stages
    x = torch.randn(1, 1, *patch(dim))
    with torch.no_grad():
        out = net(x)
        assert isinstance(out, list) and [tuple(o.shape) for o in out] == expected_shapes(dim)
        net.decoder.deep_supervision = False  # what nnUNetTrainer.set_deep_supervision_enabled does
        single = net(x)
    assert isinstance(single, torch.Tensor) and tuple(single.shape) == expected_shapes(dim)[0]
    torch.testing.assert_close(single, out[0])


@pytest.mark.parametrize("dim, arch", CASES, ids=IDS)
@pytest.mark.parametrize("deep_supervision", [True, False])
def test_forward_with_features(dim: int, arch: str, deep_supervision: bool) -> None:
    net = build(dim, arch, deep_supervision=deep_supervision)
    x = torch.randn(2, 1, *patch(dim))
    with torch.no_grad():
        out, features = net.forward_with_features(x)
        reference = net(x)
    first_features = managers(dim, arch)[1].network_arch_init_kwargs["features_per_stage"][0]
    assert tuple(features.shape) == (2, first_features, *patch(dim))
    if deep_supervision:
        assert isinstance(out, list) and len(out) == len(reference)
        for a, b in zip(out, reference):
            torch.testing.assert_close(a, b)
    else:
        torch.testing.assert_close(out, reference)
    # the features are exactly what the final 1x1 segmentation conv sees
    head = out[0] if deep_supervision else out
    torch.testing.assert_close(net.decoder.seg_layers[-1](features), head)
    # hook removed again
    assert not net.decoder.seg_layers[-1]._forward_pre_hooks


def test_features_carry_gradients() -> None:
    net = build(3)
    _, features = net.forward_with_features(torch.randn(1, 1, *patch(3)))
    features.square().mean().backward()
    assert net.hf_mamba[0].mamba_forward.in_proj.weight.grad is not None


@pytest.mark.parametrize("dim, arch", CASES, ids=IDS)
def test_stages_zero_equals_plain_network(dim: int, arch: str) -> None:
    net = build(dim, arch, stages=0, seed=1)
    reference = plain(dim, arch, seed=2)
    # identical keys: a plain nnU-Net checkpoint loads strictly, and the reverse
    assert list(net.state_dict()) == list(reference.state_dict())
    reference.load_state_dict(net.state_dict(), strict=True)
    x = torch.randn(1, 1, *patch(dim))
    with torch.no_grad():
        for a, b in zip(net(x), reference(x)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_same_seed_builds_the_same_planned_weights_as_nnunet() -> None:
    """nnU-Net's init runs before HF-Mamba is created: the U-Net part equals nnU-Net's own build."""
    net = build(3, stages=1, seed=3)
    reference = plain(3, seed=3)
    ours = net.state_dict()
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(ours[key], value, rtol=0, atol=0, msg=key)


def test_hf_mamba_keeps_mamba_init() -> None:
    net = build(3, stages=2)
    assert [m.channels for m in net.hf_mamba] == [48, 32]  # bottleneck first, then the stage above
    for module in net.hf_mamba:
        assert isinstance(module, HFMamba)
        for mamba in (module.mamba_forward, module.mamba_backward):
            d_state = mamba.d_state
            torch.testing.assert_close(mamba.A_log[0], torch.log(torch.arange(1, d_state + 1.0)))
            dt = torch.nn.functional.softplus(mamba.dt_proj.bias.detach())
            assert dt.min() >= 1e-3 * (1 - 1e-4) and dt.max() <= 0.1 * (1 + 1e-4)  # not zeroed by He init
            assert mamba.in_proj.weight.abs().max() <= 1.0 / mamba.d_model**0.5 + 1e-6  # Linear's own init


@pytest.mark.parametrize("dim, arch", CASES, ids=IDS)
@pytest.mark.parametrize("stages", [1, 2])
def test_state_dict_round_trip(dim: int, arch: str, stages: int) -> None:
    a = build(dim, arch, stages=stages, seed=1)
    b = build(dim, arch, stages=stages, seed=2, deep_supervision=False)  # as nnUNetv2_predict builds it
    keys = list(a.state_dict())
    assert any(k.startswith("hf_mamba.") for k in keys) and keys == list(b.state_dict())
    b.load_state_dict(a.state_dict(), strict=True)
    a.decoder.deep_supervision = False
    x = torch.randn(1, 1, *patch(dim))
    with torch.no_grad():
        torch.testing.assert_close(b(x), a(x), rtol=0, atol=0)


@pytest.mark.parametrize("saved, built", [(2, 1), (1, 2), (1, 3)])
def test_loads_hf_mamba_saved_at_another_width_at_its_own_width(saved: int, built: int) -> None:
    # what nnUNetv2_predict does with a model trained before the trainer's hf_mamba_expand changed: the network is
    # built at the class's width, then loaded; it must predict exactly as the saved network
    a = build(2, stages=2, seed=1, mamba_kwargs={"expand": saved, "d_state": 4})
    b = build(2, stages=2, seed=2, deep_supervision=False, mamba_kwargs={"expand": built, "d_state": 4})
    assert all(m.expand == built for m in b.hf_mamba)
    b.load_state_dict(a.state_dict(), strict=True)
    assert all(m.expand == saved and m.mamba_forward.d_inner == saved * m.channels and m.mamba_forward.d_state == 4
               for m in b.hf_mamba)
    a.decoder.deep_supervision = False
    x = torch.randn(1, 1, *patch(2))
    with torch.no_grad():
        torch.testing.assert_close(b(x), a(x), rtol=0, atol=0)


def test_stage_count_mismatch_does_not_load() -> None:
    with pytest.raises(RuntimeError, match="hf_mamba"):
        build(3, stages=1).load_state_dict(build(3, stages=2).state_dict(), strict=True)


def test_options_reach_the_modules() -> None:
    net = build(2, stages=2, cutoff_ratio=0.4, mamba_kwargs={"d_state": 4, "expand": 1})
    assert all(m.cutoff_ratio == 0.4 for m in net.hf_mamba)
    assert all(m.mamba_forward.d_state == 4 and m.mamba_forward.d_inner == m.channels for m in net.hf_mamba)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="hf_mamba_stages"):
        build(3, stages=3)
    with pytest.raises(TypeError, match="encoder/decoder"):
        HFMambaUNet(torch.nn.Conv3d(1, 1, 1))


def test_train_step_and_autocast() -> None:
    net = build(3, stages=2)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    x = torch.randn(2, 1, *patch(3))
    target = torch.randint(0, NUM_CLASSES, (2, *patch(3)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x)
        loss = torch.nn.functional.cross_entropy(out[0].float(), target)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.hf_mamba.parameters())


def test_compute_conv_feature_map_size_matches_planned_network() -> None:
    p = patch(3)
    assert build(3).compute_conv_feature_map_size(p) == plain(3).compute_conv_feature_map_size(p)


def test_plans_are_not_mutated() -> None:
    plans = make_plans()
    before = copy.deepcopy(plans)
    pm = PlansManager(plans)
    build_hf_mamba_network(pm, pm.get_configuration("3d_fullres"), 1, NUM_CLASSES)
    assert plans == before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_forward_backward() -> None:
    net = build(3, stages=2).cuda()
    x = torch.randn(2, 1, *patch(3), device="cuda")
    with torch.autocast("cuda", dtype=torch.float16):
        out = net(x)
    sum(o.float().mean() for o in out).backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)
