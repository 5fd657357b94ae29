"""`pip install .` works without build isolation tricks: an isolated build (no torch in it) gives a pure-Python
wheel that ships py.typed and the C++ sources, and the installed package JIT-builds and runs its C++ kernels."""
import os
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = [pytest.mark.cpu_only, pytest.mark.slow]


def _run(command, **kwargs):
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, **kwargs)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """``pip install .`` as a user runs it (isolated build), into a target folder; returns (wheel, site folder)."""
    work = tmp_path_factory.mktemp("packaging")
    _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(work / "wheels"), ROOT])
    (wheel,) = (work / "wheels").glob("dropreg-*.whl")
    _run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(work / "site"), str(wheel)])
    return wheel, work


def test_wheel_ships_types_and_kernel_sources(installed):
    wheel, _ = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "dropreg/py.typed" in names
    sources = sorted(os.listdir(os.path.join(ROOT, "csrc")))
    assert sources and all(f"dropreg/_csrc/{name}" in names for name in sources)
    assert not any(name.endswith(".so") for name in names)  # no torch in the isolated build: nothing compiled
    assert wheel.name.endswith("-py3-none-any.whl")


def test_installed_package_jit_builds_and_runs_its_cpp_kernels(installed):
    _, work = installed
    script = (
        "import torch, dropreg, dropreg._build as b\n"
        "assert dropreg.__file__.startswith(%r), dropreg.__file__\n"
        "assert b.CSRC.endswith('dropreg/_csrc') and b.sources(), b.CSRC\n"
        "h = torch.randn(9, 5, dtype=torch.float64, requires_grad=True)\n"
        "w = torch.randn(300, 5, dtype=torch.float64)\n"
        "y = torch.randint(0, 300, (9,))\n"
        "ours = dropreg.linear_cross_entropy(h, w, y, seed=1, backend='cpu').loss\n"
        "ref = dropreg.linear_cross_entropy(h, w, y, seed=1, backend='reference').loss\n"
        "assert abs(float(ours - ref)) < 1e-12, (ours, ref)\n"
        "print('ok')\n" % str(work / "site")
    )
    env = dict(os.environ, PYTHONPATH=str(work / "site"), TORCH_EXTENSIONS_DIR=str(work / "torch_extensions"))
    done = _run([sys.executable, "-c", script], cwd=str(work), env=env)
    assert done.stdout.strip().endswith("ok")


def test_sdist_carries_the_cpp_sources(tmp_path):
    """An sdist must carry csrc/ (headers included, MANIFEST.in), or a package built from it could not compile."""
    import tarfile

    _run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path)], cwd=ROOT)
    (sdist,) = tmp_path.glob("dropreg-*.tar.gz")
    names = {name.split("/", 1)[1] for name in tarfile.open(sdist).getnames() if "/" in name}
    assert {f"csrc/{name}" for name in os.listdir(os.path.join(ROOT, "csrc"))} <= names
    assert {"pyproject.toml", "setup.py", "dropreg/py.typed"} <= names
