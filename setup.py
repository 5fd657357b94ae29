"""Builds dropreg. The C++ CPU kernels in csrc/ are compiled into ``dropreg._C`` when sources exist there.

Install with ``pip install --no-build-isolation -e .`` after ``pip install torch==2.13.0``: this file
imports torch, and build isolation would fetch a different (CUDA) torch.
"""
import importlib.util
import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def extension_modules():
    spec = importlib.util.spec_from_file_location("_build", os.path.join(HERE, "dropreg", "_build.py"))
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    sources = [os.path.relpath(path, HERE) for path in build.sources()]
    if not sources:
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    ext = CppExtension("dropreg._C", sources, extra_compile_args={"cxx": build.CXX_FLAGS},
                       extra_link_args=build.LINK_FLAGS)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extension_modules()

setup(
    name="dropreg",
    version="0.1.0",
    description="Dropout's explicit and implicit regularizers fused with the LM-head cross entropy",
    long_description=open(os.path.join(HERE, "README.md")).read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["dropreg", "dropreg.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.11"],  # lower bounds: README's "Supported versions" (tests/test_docs.py)
    extras_require={"test": ["pytest", "hypothesis", "numpy", "triton>=3.6"], "benchmarks": ["matplotlib"],
                    "triton": ["triton>=3.6"],
                    "hf": ["transformers>=5.0", "accelerate"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
