"""``nnUNetv2_diffcl predict_ensemble``: predict with Diff-CL's DS + CS ensemble (optional, never the default).

``nnUNetv2_predict -tr DiffCLTrainer`` runs CS alone, as any nnU-Net model. This command runs nnU-Net's
own predictor (preprocessing, sliding window, mirroring, export) on a network that averages CS's
softmax with the softmax of DS's DDIM-sampled clean-label logits. Each fold's checkpoint supplies both
networks (``network_weights`` for CS, the ``semi_supervised`` entry for DS), so folds ensemble as usual.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import torch
from torch import nn

from nnunetv2_diffcl.diffusion_branch import DiffusionBranch
from nnunetv2_diffcl.errors import UserInputError, error_line


class DSCSEnsemble(nn.Module):
    """log of the mean of CS's and DS's class probabilities (nnU-Net applies softmax to the output)."""

    def __init__(self, cs: nn.Module, branch: DiffusionBranch, seed: int = 0) -> None:
        super().__init__()
        self.cs = cs
        self.ds = branch.denoiser  # a child module, so that the state dict holds ds.* keys
        self.branch = branch
        self.seed = seed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cs = self.cs(x)
        cs = cs[0] if isinstance(cs, list) else cs
        generator = torch.Generator(device="cpu").manual_seed(self.seed)  # same noise for every patch
        ds = self.branch.sample_logits(x, generator)
        probabilities = (torch.softmax(cs.float(), 1) + torch.softmax(ds.float(), 1)) / 2
        return torch.log(probabilities.clamp_min(1e-8))


def ensemble_parameters(checkpoints: list[dict]) -> list[dict]:
    """Per fold, one state dict for DSCSEnsemble (``cs.*`` and ``ds.*`` keys)."""
    combined = []
    for checkpoint in checkpoints:
        state = checkpoint.get("semi_supervised", {}).get("networks", {})
        if "ds" not in state:
            raise UserInputError(f"checkpoint of {checkpoint.get('trainer_name')} holds no diffusion branch (DS): "
                                 "the ensemble needs a DiffCLTrainer checkpoint")
        combined.append({**{f"cs.{k}": v for k, v in checkpoint["network_weights"].items()},
                         **{f"ds.{k}": v for k, v in state["ds"].items()}})
    return combined


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-i", required=True, help="input folder (nnU-Net naming, as for nnUNetv2_predict)")
    parser.add_argument("-o", required=True, help="output folder")
    parser.add_argument("-d", required=True, help="dataset id or name")
    parser.add_argument("-c", default="3d_fullres", help="configuration")
    parser.add_argument("-f", nargs="+", default=["all"], help="folds (default: all)")
    parser.add_argument("-tr", default="DiffCLTrainer", help="trainer (a DiffCLTrainer or a subclass with DS)")
    parser.add_argument("-p", default="nnUNetPlans", help="plans identifier")
    parser.add_argument("-chk", default="checkpoint_final.pth", help="checkpoint file name")
    parser.add_argument("--ddim_steps", type=int, default=None, help="DDIM steps for DS (default: the trainer's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of DS's sampling noise")
    parser.add_argument("--disable_tta", action="store_true", help="no mirroring at test time")
    parser.add_argument("-device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("-npp", type=int, default=1, help="preprocessing processes")
    parser.add_argument("-nps", type=int, default=1, help="export processes")


def trained_model_folder(args: argparse.Namespace) -> tuple[str, list[int | str]]:
    """(the model folder, its folds) of ``-d -tr -p -c -f -chk``, refused with the fix when a fold's checkpoint is
    missing (the commands that load a trained model: ``predict_ensemble``, ``self_training_round``)."""
    from os.path import isfile, join

    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    from nnunetv2.utilities.file_path_utilities import get_output_folder

    folds = [f if f == "all" else int(f) for f in args.f]
    model = get_output_folder(maybe_convert_to_dataset_name(args.d), args.tr, args.p, args.c)
    missing = [join(model, f"fold_{f}", args.chk) for f in folds if not isfile(join(model, f"fold_{f}", args.chk))]
    if missing:
        raise UserInputError(f"{', '.join(missing)} not found: train the model first (nnUNetv2_train {args.d} "
                             f"{args.c} FOLD -tr {args.tr}), or pass the folds (-f) and checkpoint (-chk) it has")
    return model, folds


def build_predictor(args: argparse.Namespace, log: Callable[[str], None] = print):
    """nnU-Net's predictor for the trained model, with its network replaced by the ensemble."""
    from os.path import join

    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels

    from nnunetv2_diffcl.trainers.diffcl import DiffCLTrainer, DiffCLTrainer_noDiffusion, checkpoint_ds_width

    if args.ddim_steps is not None and args.ddim_steps < 1:
        raise UserInputError(f"--ddim_steps {args.ddim_steps}: give at least 1 (or leave it out: the trainer's)")
    trainer_class = recursive_find_trainer_class_by_name(args.tr)
    if trainer_class is None:
        raise UserInputError(f"-tr {args.tr}: nnU-Net finds no trainer of that name (`nnUNetv2_diffcl doctor` lists "
                             f"the plugin's)")
    if not issubclass(trainer_class, DiffCLTrainer) or issubclass(trainer_class, DiffCLTrainer_noDiffusion):
        raise UserInputError(f"-tr {args.tr} has no diffusion branch; give DiffCLTrainer or a variant with DS")
    device = torch.device(args.device)
    predictor = nnUNetPredictor(use_mirroring=not args.disable_tta, device=device,
                                perform_everything_on_device=device.type == "cuda", allow_tqdm=False)
    model, folds = trained_model_folder(args)
    predictor.initialize_from_trained_model_folder(model, folds, args.chk)
    checkpoints = [torch.load(join(model, f"fold_{f}", args.chk), map_location="cpu", weights_only=False)
                   for f in folds]
    settings = trainer_class.diffusion_settings()
    widths = {checkpoint_ds_width(c.get("semi_supervised", {})) for c in checkpoints}
    if len(widths) > 1:
        raise UserInputError(f"the folds' checkpoints hold DS networks of different widths {sorted(widths)}: "
                             f"ensemble folds trained with one DS width")
    settings["width_fraction"] = widths.pop()  # what was trained, whatever the class's default is now
    if args.ddim_steps is not None:
        settings["ddim_steps"] = args.ddim_steps
    branch = DiffusionBranch.from_plans(predictor.plans_manager, predictor.configuration_manager,
                                        determine_num_input_channels(predictor.plans_manager,
                                                                     predictor.configuration_manager,
                                                                     predictor.dataset_json),
                                        predictor.label_manager.num_segmentation_heads, deep_supervision=False,
                                        device=device, **settings)
    steps = branch.ddim_steps
    predictor.network = DSCSEnsemble(predictor.network, branch, args.seed)
    predictor.list_of_parameters = ensemble_parameters(checkpoints)
    predictor.network.load_state_dict(predictor.list_of_parameters[0])
    log(f"DS + CS ensemble of {args.tr} (folds {args.f}, DS with {steps} DDIM steps)")
    return predictor


def run(args: argparse.Namespace) -> int:
    try:
        predictor = build_predictor(args)  # UserInputError: bad arguments or no trained model (exit 2)
    except RuntimeError as e:  # nnU-Net could not find the dataset or trainer
        print(error_line("predict_ensemble", e), file=sys.stderr)
        return 1
    predictor.predict_from_files(args.i, args.o, save_probabilities=False, overwrite=True,
                                 num_processes_preprocessing=args.npp, num_processes_segmentation_export=args.nps)
    return 0
