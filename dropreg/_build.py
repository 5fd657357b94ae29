"""How the C++ CPU kernels are compiled: one definition for setup.py and for the JIT build.

Imported by setup.py by path (before dropreg is installed), so it must not import the package.
"""
import glob
import os

CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")
# -fopenmp at compile AND link time, or at::parallel_for runs on one thread (TOOLCHAIN.md); the AVX2
# defines make at::vec::Vectorized use AVX2 instead of plain loops.
CXX_FLAGS = ["-O3", "-fopenmp", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma"]
LINK_FLAGS = ["-fopenmp"]


def sources():
    return sorted(glob.glob(os.path.join(CSRC, "*.cpp")))
