"""README's commands are the ones CI runs, and its supported versions are setup.py's."""
import ast
import os
import re
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(*parts):
    with open(os.path.join(ROOT, *parts)) as f:
        return f.read()


def test_ci_runs_the_readme_test_command():
    readme = _read("README.md")
    match = re.search(r"^Tests:\n\n```\n(.+?)\n```", readme, flags=re.M | re.S)
    assert match, "README.md needs a 'Tests:' line followed by a fenced command"
    command = match.group(1).strip()
    ci_lines = [line.strip() for line in _read(".ci", "run").splitlines()]
    assert command in ci_lines


def test_readme_pins_torch_in_both_commands():
    readme = _read("README.md")
    section = readme[readme.index("## The two commands"):]
    section = section[:section.index("\n## ", 1)]
    blocks = re.findall(r"```\n(pip[^\n]*|python3 -m pip[^\n]*)\n```", section)
    assert len(blocks) == 2 and all("torch==2.13.0" in b for b in blocks)


def _version(text):
    return tuple(int(part) for part in re.match(r"\d+(?:\.\d+)*", text).group(0).split("."))


def _supported_versions():
    """README's "Supported versions" table: package -> (minimum, CI version)."""
    section = re.search(r"^### Supported versions\n(.+?)(?=^#)", _read("README.md"), flags=re.M | re.S)
    assert section, "README.md needs a '### Supported versions' section"
    rows = re.findall(r"^\| (\w+) \| ([\d.]+) \| ([\d.]+)\b", section.group(1), flags=re.M)
    return {name: (minimum, ci) for name, minimum, ci in rows}


def _setup_lower_bounds():
    """Every ``name>=version`` in setup.py's install_requires and extras_require, read without running it."""
    tree = ast.parse(_read("setup.py"))
    call = next(node for node in ast.walk(tree)
                if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setup")
    keywords = {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords
                if kw.arg in ("install_requires", "extras_require")}
    requirements = list(keywords["install_requires"])
    for extra in keywords["extras_require"].values():
        requirements += extra
    bounds = {}
    for requirement in requirements:
        match = re.fullmatch(r"([\w-]+)\s*>=\s*([\d.]+)", requirement)
        if match:
            bounds.setdefault(match.group(1), set()).add(match.group(2))
    return bounds


def test_readme_supported_versions_match_setup_py():
    table = _supported_versions()
    bounds = _setup_lower_bounds()
    assert set(table) == {"torch", "triton", "transformers"} and set(bounds) == set(table)
    for name, (minimum, _) in table.items():
        assert bounds[name] == {minimum}, f"{name}: setup.py requires >= {bounds[name]}, README says {minimum}"


def test_readme_ci_versions_are_the_ci_pins_and_above_the_minimums():
    ci_command = _read(".ci", "run")
    for name, (minimum, ci) in _supported_versions().items():
        assert f"{name}=={ci}" in ci_command, f"README's CI column says {name} {ci}; .ci/run pins another"
        assert _version(ci) >= _version(minimum)


def test_gpu_page_compile_report_rows_come_from_the_committed_report():
    """docs/gpu.md quotes rows of docs/gpu/compile_report.md; each must be there verbatim (a regenerated report
    would otherwise leave stale register counts on the page)."""
    report = {line.strip() for line in _read("docs", "gpu", "compile_report.md").splitlines() if line.startswith("| ")}
    kernel_rows = [line.strip() for line in _read("docs", "gpu.md").splitlines()
                   if line.startswith("| ") and "_kernel" in line and line.count("|") == 11]
    assert len(kernel_rows) >= 10
    missing = [row for row in kernel_rows if row not in report]
    assert not missing, missing


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
@pytest.mark.parametrize("value,message", [("cuda", "torch sees no CUDA device"),
                                           ("tpu", "DROPREG_TEST_DEVICE: expected 'cpu' or 'cuda'")])
def test_gpu_suite_command_refuses_clearly_without_a_gpu(value, message):
    """README's GPU test command, run here, stops at collection with a message that says why."""
    env = dict(os.environ, DROPREG_TEST_DEVICE=value)
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "--collect-only", "tests/test_docs.py"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert message in done.stdout + done.stderr
    assert "DROPREG_TEST_DEVICE=cuda python -m pytest -q" in open(os.path.join(ROOT, "README.md")).read()
