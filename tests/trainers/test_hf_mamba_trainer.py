"""HFMambaTrainer as nnU-Net uses it: network building (train and predict call sites), deep
supervision switch, no torch.compile, one training step on the CPU."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunetv2_diffcl.network_architectures.cnn_branch import HFMambaUNet
from nnunetv2_diffcl.trainers.hf_mamba import HFMambaTrainer
from tests.network_architectures.test_cnn_branch import DATASET_JSON, NUM_CLASSES, make_plans


class TwoStageTrainer(HFMambaTrainer):
    hf_mamba_stages = 2
    hf_cutoff_ratio = 0.4
    hf_mamba_expand = 1


def managers(configuration: str = "3d_fullres"):  # noqa: ANN201 - (PlansManager, ConfigurationManager)
    pm = PlansManager(make_plans())
    return pm, pm.get_configuration(configuration)


@pytest.fixture
def trainer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> HFMambaTrainer:
    plans = make_plans()
    identifier = plans["configurations"]["3d_fullres"]["data_identifier"]
    data = tmp_path / "preprocessed" / plans["dataset_name"] / identifier
    data.mkdir(parents=True)
    (data / "case_000.b2nd").touch()  # nnU-Net infers its dataset class from the file endings
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "preprocessed"))
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    plans["continue_training"] = False
    return HFMambaTrainer(plans, "3d_fullres", 0, DATASET_JSON, device=torch.device("cpu"))


def test_signatures_are_what_nnunet_reads() -> None:
    # nnU-Net stores __init__ arguments by reading the signature: it must be nnUNetTrainer's own
    assert inspect.signature(HFMambaTrainer.__init__) == inspect.signature(nnUNetTrainer.__init__)
    # both call sites check for the new-style signature before calling
    for target in (HFMambaTrainer.build_network_architecture, TwoStageTrainer.build_network_architecture):
        params = list(inspect.signature(target).parameters)
        assert params == ["plans_manager", "configuration_manager", "num_input_channels",
                          "num_output_channels", "enable_deep_supervision"]


@pytest.mark.parametrize("cls, stages, cutoff, expand", [(HFMambaTrainer, 1, 0.25, 2), (TwoStageTrainer, 2, 0.4, 1)])
@pytest.mark.parametrize("configuration", ["2d", "3d_fullres"])
def test_build_as_nnunetv2_predict_does(cls: type, stages: int, cutoff: float, expand: int, configuration: str
                                        ) -> None:
    pm, cm = managers(configuration)
    net = cls.build_network_architecture(pm, cm, 1, NUM_CLASSES, enable_deep_supervision=False)
    assert isinstance(net, HFMambaUNet) and len(net.hf_mamba) == stages
    assert all(m.cutoff_ratio == cutoff for m in net.hf_mamba)
    # the class's hf_mamba_expand reaches both Mamba layers: inner width = expand x the stage's channels
    assert all(mamba.d_inner == expand * m.channels for m in net.hf_mamba
               for mamba in (m.mamba_forward, m.mamba_backward))
    with torch.no_grad():
        out = net(torch.randn(1, 1, *cm.patch_size))
    assert isinstance(out, torch.Tensor) and tuple(out.shape) == (1, NUM_CLASSES, *cm.patch_size)


@pytest.mark.parametrize("expand", [0, 1.5, "2"])
def test_bad_hf_mamba_expand_is_refused_by_name(expand: object) -> None:
    pm, cm = managers("2d")
    bad = type("BadExpandTrainer", (HFMambaTrainer,), {"hf_mamba_expand": expand})
    with pytest.raises(ValueError, match="BadExpandTrainer: hf_mamba_expand must be a whole number >= 1"):
        bad.build_network_architecture(pm, cm, 1, NUM_CLASSES, enable_deep_supervision=False)


def test_initialize_builds_network_without_compile(trainer: HFMambaTrainer) -> None:
    assert trainer._do_i_compile() is False
    trainer.initialize()
    net = trainer.network
    assert isinstance(net, HFMambaUNet) and len(net.hf_mamba) == 1
    assert net.decoder.deep_supervision is True
    trainer.set_deep_supervision_enabled(False)
    assert net.decoder.deep_supervision is False
    trainer.set_deep_supervision_enabled(True)
    # the optimizer covers the HF-Mamba parameters too
    optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert all(id(p) in optimised for p in net.hf_mamba.parameters())


def test_train_step_and_predict_checkpoint(trainer: HFMambaTrainer) -> None:
    trainer.initialize()
    cm = trainer.configuration_manager
    patch = cm.patch_size
    scales = trainer._get_deep_supervision_scales()
    torch.manual_seed(0)
    data = torch.randn(2, 1, *patch)
    label = torch.randint(0, NUM_CLASSES, (2, 1, *patch)).float()
    target = [torch.nn.functional.interpolate(label, scale_factor=tuple(s), mode="nearest") for s in scales]
    before = {k: v.clone() for k, v in trainer.network.hf_mamba.state_dict().items()}
    result = trainer.train_step({"data": data, "target": target})
    assert torch.isfinite(torch.as_tensor(result["loss"]))
    after = trainer.network.hf_mamba.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before), "HF-Mamba was not trained"

    # nnUNetv2_predict: build on the class without deep supervision, load the weights strictly
    pm, cm = managers()
    predictor_net = HFMambaTrainer.build_network_architecture(pm, cm, 1, NUM_CLASSES,
                                                              enable_deep_supervision=False)
    predictor_net.load_state_dict(trainer.network.state_dict(), strict=True)
    trainer.set_deep_supervision_enabled(False)
    trainer.network.eval()
    predictor_net.eval()
    with torch.no_grad():
        torch.testing.assert_close(predictor_net(data), trainer.network(data), rtol=0, atol=0)


def test_resume_at_another_hf_mamba_width_is_refused(trainer: HFMambaTrainer, tmp_path: Path) -> None:
    # the optimizer holds the parameters built at the trainer's width: resuming from another width must stop with
    # the fix named, before anything is loaded
    trainer.initialize()
    pm, cm = managers()
    narrow = TwoStageTrainer.build_network_architecture(pm, cm, 1, NUM_CLASSES)  # expand 1, two stages
    torch.save({"network_weights": narrow.state_dict()}, tmp_path / "checkpoint_latest.pth")
    before = {k: v.clone() for k, v in trainer.network.state_dict().items()}
    with pytest.raises(RuntimeError, match=r"inner width 1x .* HFMambaTrainer builds 2x .* hf_mamba_expand is 1"):
        trainer.load_checkpoint(str(tmp_path / "checkpoint_latest.pth"))
    assert all(torch.equal(before[k], v) for k, v in trainer.network.state_dict().items())


def test_real_nnunet_train_and_predict(dataset_copy) -> None:
    """nnUNetv2_train -tr HFMambaTrainer and nnUNetv2_predict, as subprocesses, on the CPU."""
    import numpy as np
    import SimpleITK as sitk

    from tests.conftest import DATASET_ID, command, run_command

    env = dataset_copy.env
    run_command([command("nnUNetv2_train"), str(DATASET_ID), "3d_fullres", "all", "-tr", "HFMambaTrainer",
                 "-device", "cpu"], {**env, "nnUNet_diffcl_epochs": "1"})
    fold = dataset_copy.results / "HFMambaTrainer__nnUNetPlans__3d_fullres" / "fold_all"
    weights = torch.load(fold / "checkpoint_final.pth", weights_only=False)["network_weights"]
    assert any(k.startswith("hf_mamba.0.mamba_forward.") for k in weights)
    out = dataset_copy.predict_test_set("HFMambaTrainer", env)
    prediction = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "syn_007.nii.gz")))
    assert prediction.shape == (32, 32, 32) and set(np.unique(prediction)) <= {0, 1}
