"""Packaging for nnunetv2-diffcl.

Besides the package, the wheel carries two startup files at the top of site-packages
(``nnunetv2_diffcl.pth`` and, for Python >= 3.15 / PEP 829, ``nnunetv2_diffcl.start``) that register the
plugin's trainer folder in ``nnUNet_extTrainer`` (see nnunetv2_diffcl/trainer_discovery.py), so that
``nnUNetv2_train -tr DiffCLTrainer`` works after a plain ``pip install``.
"""

import os

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

STARTUP_FILES = {
    "nnunetv2_diffcl.pth": "import nnunetv2_diffcl.trainer_discovery as _m; _m.startup()\n",
    "nnunetv2_diffcl.start": "nnunetv2_diffcl.trainer_discovery:startup\n",
}


class BuildPyWithStartupFiles(build_py):
    """Writes the startup files next to the package, i.e. at the top level of the wheel."""

    def run(self) -> None:
        super().run()
        for name, content in STARTUP_FILES.items():
            path = os.path.join(self.build_lib, name)
            with open(path, "w", encoding="utf-8") as f:
                f.write(content)

    def get_outputs(self, include_bytecode: bool = True) -> list:
        return super().get_outputs(include_bytecode) + [os.path.join(self.build_lib, n) for n in STARTUP_FILES]

    def get_output_mapping(self) -> dict:
        mapping = super().get_output_mapping()
        mapping.update({os.path.join(self.build_lib, n): n for n in STARTUP_FILES})
        return mapping


class EditableWheelWithStartupFiles(editable_wheel):
    """``pip install -e .`` builds its wheel without build_py's top-level files: add them here.

    ``_install_namespaces`` is the step that receives the unpacked editable wheel's folder; the
    discovery test in tests/test_trainer_discovery.py fails if a setuptools release changes that.
    """

    def _install_namespaces(self, installation_dir, pth_prefix):  # noqa: ANN001 - setuptools' signature
        super()._install_namespaces(installation_dir, pth_prefix)
        for name, content in STARTUP_FILES.items():
            with open(os.path.join(installation_dir, name), "w", encoding="utf-8") as f:
                f.write(content)


def _version() -> str:
    about: dict = {}
    with open(os.path.join("nnunetv2_diffcl", "__init__.py"), encoding="utf-8") as f:
        for line in f:
            if line.startswith("__version__"):
                exec(line, about)
    return about["__version__"]


setup(
    name="nnunetv2-diffcl",
    version=_version(),
    description="Diff-CL semi-supervised segmentation (diffusion + CNN cross pseudo-supervision, HF-Mamba, "
                "contrastive label propagation) as an nnU-Net v2 plugin",
    long_description=open("README.md", encoding="utf-8").read() if os.path.isfile("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["nnunetv2_diffcl", "nnunetv2_diffcl.*"]),
    install_requires=[
        "nnunetv2>=2.8,<2.9",
        "torch>=2.1",
        "batchgenerators>=0.25",
        "batchgeneratorsv2>=0.3",
        "SimpleITK>=2.2",
        "acvl-utils>=0.2",
        "dynamic-network-architectures>=0.4",
        "numpy",
        "scipy",
        "matplotlib",
        "medpy>=0.5",
        "h5py",
    ],
    extras_require={
        "mamba": ["mamba-ssm>=2.2"],
        "test": ["pytest>=8", "ruff"],
    },
    entry_points={"console_scripts": ["nnUNetv2_diffcl=nnunetv2_diffcl.cli:main"]},
    cmdclass={"build_py": BuildPyWithStartupFiles, "editable_wheel": EditableWheelWithStartupFiles},
    zip_safe=False,
)
