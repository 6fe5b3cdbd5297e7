"""Build the optional C++ CPU kernels (alignmerge._C, pybind11 + OpenMP).

If the compiler or OpenMP is missing the build is skipped with a warning and
alignmerge falls back to its torch reference implementations at run time.
"""
import glob
import sys

from setuptools import find_packages, setup
from setuptools.command.build_ext import build_ext

try:
    from pybind11.setup_helpers import Pybind11Extension
except ImportError:  # pybind11 is declared in pyproject's build requirements
    Pybind11Extension = None


class OptionalBuildExt(build_ext):
    """Build extensions, but never fail the install because of them."""

    def run(self):
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001 - any compiler failure
            print(f"WARNING: alignmerge._C was not built ({exc}); torch fallback will be used",
                  file=sys.stderr)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001
            print(f"WARNING: building {ext.name} failed ({exc}); torch fallback will be used",
                  file=sys.stderr)


ext_modules = []
if Pybind11Extension is not None:
    ext_modules.append(
        Pybind11Extension(
            "alignmerge._C",
            sorted(glob.glob("csrc/*.cpp")),
            include_dirs=["csrc"],
            extra_compile_args=["-O3", "-fopenmp", "-march=native", "-ffp-contract=off"],
            extra_link_args=["-fopenmp"],
            cxx_std=17,
        )
    )

setup(
    packages=find_packages(include=["alignmerge", "alignmerge.*"]) + ["alignmerge.kernels"],
    package_dir={"alignmerge.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass={"build_ext": OptionalBuildExt},
)
