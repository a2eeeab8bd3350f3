"""The plugin's schedule variables, read once by every plugin trainer.

``nnUNet_diffcl_epochs``, ``_iterations`` and ``_val_iterations`` shorten a trainer's schedule for one run (the
demo, the benchmark, the tests): environment variables rather than arguments, because nnU-Net fixes the
trainer's ``__init__`` signature. Every plugin trainer derives from :class:`ScheduleFromEnvironment`, so the
labeled-only baseline and the semi-supervised trainers follow the same schedule when the variables are set.
"""

import os
from collections.abc import Callable
from typing import Any

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

SCHEDULE_VARIABLES = {"nnUNet_diffcl_epochs": "num_epochs",
                      "nnUNet_diffcl_iterations": "num_iterations_per_epoch",
                      "nnUNet_diffcl_val_iterations": "num_val_iterations_per_epoch"}


def override_from_environment(trainer: Any, variable: str, attribute: str, cast: Callable[[str], Any],
                              kind: str) -> bool:
    """An experiment's knob: ``variable``, when set, overrides ``attribute`` for one run; True if it did."""
    value = os.environ.get(variable)
    if not value:
        return False
    try:
        setattr(trainer, attribute, cast(value))
    except ValueError:
        raise ValueError(f"{variable} must be {kind}, got {value!r}") from None
    return True


class ScheduleFromEnvironment(nnUNetTrainer):
    """nnUNetTrainer whose epochs, iterations per epoch and validation iterations follow the
    ``nnUNet_diffcl_*`` schedule variables when they are set.

    ``schedule_epochs`` replaces nnU-Net's 1000 epochs in a variant (``DiffCLTrainer_250epochs``, as nnU-Net's
    ``nnUNetTrainer_250epochs``); the variables still win over it for one run.
    """

    schedule_epochs: int | None = None

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        if self.schedule_epochs is not None:
            self.num_epochs = self.schedule_epochs
        for variable, attribute in SCHEDULE_VARIABLES.items():
            if override_from_environment(self, variable, attribute, int, "a whole number") and \
                    getattr(self, attribute) <= 0:
                raise ValueError(f"{variable} must be a positive whole number, got {os.environ[variable]}")
