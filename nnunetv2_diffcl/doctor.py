"""``nnUNetv2_diffcl doctor``: what is installed, and whether nnU-Net finds every plugin trainer.

Resolves each trainer through nnU-Net's own lookup function, exactly as ``nnUNetv2_train -tr NAME``
and ``nnUNetv2_predict`` do, so a green doctor means those commands find the trainers.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
from importlib.metadata import PackageNotFoundError, version

from nnunetv2_diffcl import trainer_discovery


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-v", "--verbose", action="store_true", help="show nnU-Net's lookup output")


def _version(dist: str) -> str:
    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"


def run(args: argparse.Namespace) -> int:
    import torch

    print(f"nnunetv2-diffcl   {_version('nnunetv2-diffcl')}")
    print(f"nnunetv2          {_version('nnunetv2')}")
    print(f"torch             {torch.__version__}")
    cuda = torch.cuda.is_available()
    print(f"device            {'cuda: ' + torch.cuda.get_device_name(0) if cuda else 'cpu (no CUDA device)'}")
    try:
        from nnunetv2_diffcl.network_architectures.selective_scan import describe_scan_backend
        print(f"selective scan    {describe_scan_backend()}")
    except ImportError:
        print("selective scan    (not available in this version)")

    registered = trainer_discovery.is_registered()
    print(f"{trainer_discovery.ENV_VAR} = {os.environ.get(trainer_discovery.ENV_VAR, '<unset>')}")
    print(f"plugin trainer folder {trainer_discovery.EXT_TRAINER_DIR}: "
          f"{'listed' if registered else 'NOT listed'}")

    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    from nnunetv2_diffcl.trainers import PLUGIN_TRAINERS

    failures = []
    width = max(len(cls.__name__) for cls in PLUGIN_TRAINERS) + 2
    for cls in PLUGIN_TRAINERS:
        output = io.StringIO()
        try:
            with contextlib.redirect_stdout(output):
                found = recursive_find_trainer_class_by_name(cls.__name__)
            ok = found.__module__ == cls.__module__ and found.__qualname__ == cls.__qualname__
            status = "found" if ok else f"found a different class {found.__module__}.{found.__name__}"
        except Exception as e:  # noqa: BLE001 - reported, with nnU-Net's words
            ok, status = False, f"NOT found ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
        print(f"  trainer {cls.__name__:<{width}}{status}")
        if args.verbose:
            print(output.getvalue())
        if not ok:
            failures.append(cls.__name__)
    if failures:
        print(f"\nnnU-Net cannot find {', '.join(failures)}.")
        if not registered:
            print("The startup hook did not register the plugin (it runs when Python starts in the environment "
                  "the plugin was installed into). Either reinstall (`pip install nnunetv2-diffcl` or "
                  "`pip install -e .`) in the environment that runs nnU-Net, or set the variable yourself:\n"
                  f"  export {trainer_discovery.ENV_VAR}=\"${{{trainer_discovery.ENV_VAR}:+${trainer_discovery.ENV_VAR}"
                  f"{os.pathsep}}}{trainer_discovery.EXT_TRAINER_DIR}\"")
        else:
            print("The folder is listed, so importing it failed: run `nnUNetv2_diffcl doctor -v` to see why.")
        return 1
    print("\nAll plugin trainers resolve through nnU-Net's lookup.")
    return 0
