"""Builds dropreg. The C++ CPU kernels in csrc/ are compiled into ``dropreg._C`` when torch can be imported.

Install with ``pip install --no-build-isolation -e .`` (or ``.`` for a regular install) after
``pip install torch==2.13.0``: the build imports torch, and build isolation would fetch a different (CUDA) torch.
A build without torch (plain ``pip install .``, isolated) makes a pure-Python package: every package carries the
C++ sources (``dropreg/_csrc``), and ``dropreg.cpu`` JIT-compiles them once on first use.
"""
import glob
import importlib.util
import os
import shutil
import sys

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))


def _load_build_module():
    spec = importlib.util.spec_from_file_location("_build", os.path.join(HERE, "dropreg", "_build.py"))
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    return build


BUILD = _load_build_module()


class BuildPyWithSources(build_py):
    """Copies csrc/ into the package as dropreg/_csrc, so an installed dropreg can JIT-build its kernels."""

    def run(self):
        super().run()
        target = os.path.join(self.build_lib, "dropreg", BUILD.PACKAGED_SOURCES)
        sources = glob.glob(os.path.join(HERE, "csrc", "*"))
        if not sources:  # an sdist without csrc/ (MANIFEST.in grafts it) would give a package that cannot build
            raise RuntimeError(f"dropreg: no C++ sources in {os.path.join(HERE, 'csrc')}")
        os.makedirs(target, exist_ok=True)
        for path in sources:
            shutil.copy(path, target)


def extension_modules():
    cmdclass = {"build_py": BuildPyWithSources}
    sources = [os.path.relpath(path, HERE) for path in BUILD.sources()]
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        print("dropreg: torch is not importable in this build (an isolated `pip install .`?): building without the "
              "C++ kernels; they will be JIT-compiled on first use", file=sys.stderr)
        return [], cmdclass
    if not sources:
        return [], cmdclass
    ext = CppExtension("dropreg._C", sources, extra_compile_args={"cxx": BUILD.CXX_FLAGS},
                       extra_link_args=BUILD.LINK_FLAGS)
    cmdclass["build_ext"] = BuildExtension.with_options(use_ninja=True)
    return [ext], cmdclass


ext_modules, cmdclass = extension_modules()

setup(
    name="dropreg",
    version="0.2.0",
    description="Dropout's explicit and implicit regularizers fused with the LM-head cross entropy",
    long_description=open(os.path.join(HERE, "README.md")).read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["dropreg", "dropreg.*"]),
    package_data={"dropreg": ["py.typed"]},
    python_requires=">=3.10",
    install_requires=["torch>=2.11"],  # lower bounds: README's "Supported versions" (tests/test_docs.py)
    extras_require={"test": ["pytest", "hypothesis", "numpy", "triton>=3.6"], "benchmarks": ["matplotlib"],
                    "triton": ["triton>=3.6"],
                    "hf": ["transformers>=5.0", "accelerate"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
