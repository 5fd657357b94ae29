"""README's commands are the ones CI runs."""
import os
import re

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
    blocks = re.findall(r"```\n(pip[^\n]*|python3 -m pip[^\n]*)\n```", _read("README.md"))
    assert len(blocks) == 2 and all("torch==2.13.0" in b for b in blocks)
