"""How the C++ CPU kernels are compiled: one definition for setup.py and for the JIT build.

Imported by setup.py by path (before dropreg is installed), so it must not import the package.
"""
import glob
import os

# A checkout (or an editable install) has csrc/ beside the package; an installed package carries a copy of it as
# dropreg/_csrc (setup.py's build_py).
PACKAGED_SOURCES = "_csrc"
_CHECKOUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")
# dropreg.cpp marks our csrc/ (an installed package's parent, site-packages, may hold an unrelated one)
CSRC = _CHECKOUT if os.path.isfile(os.path.join(_CHECKOUT, "dropreg.cpp")) else os.path.join(
    os.path.dirname(os.path.abspath(__file__)), PACKAGED_SOURCES)
# -fopenmp at compile AND link time, or at::parallel_for runs on one thread (TOOLCHAIN.md); the AVX2
# defines make at::vec::Vectorized use AVX2 instead of plain loops.
CXX_FLAGS = ["-O3", "-fopenmp", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma"]
LINK_FLAGS = ["-fopenmp"]


def sources():
    return sorted(glob.glob(os.path.join(CSRC, "*.cpp")))
