"""tools/mutation_test.py's mutant list is well-formed and in step with the sources (no mutant is run here)."""
import importlib.util
import os
import sys

import pytest

pytestmark = pytest.mark.cpu_only  # tests/conftest.py: skipped with DROPREG_TEST_DEVICE=cuda

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_tool():
    spec = importlib.util.spec_from_file_location("mutation_test", os.path.join(ROOT, "tools", "mutation_test.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


tool = _load_tool()


def test_mutants_are_well_formed():
    ids = [m.id for m in tool.MUTANTS]
    assert len(ids) == len(set(ids)), "mutant ids must be unique"
    for m in tool.MUTANTS:
        assert m.backend in tool.SELECTIONS, m.id
        assert m.original and m.replacement and m.original != m.replacement, m.id
        assert "\n" not in m.original and m.description, m.id
        assert os.path.isfile(os.path.join(ROOT, m.file)), m.id
    assert "dropreg/reference.py" not in {m.file for m in tool.MUTANTS if m.backend != "reference"}


def test_every_backend_has_mutants_and_a_selection():
    counts = {backend: sum(m.backend == backend for m in tool.MUTANTS) for backend in tool.SELECTIONS}
    assert all(counts[b] >= 4 for b in ("api", "torch", "cpu", "triton")), counts
    assert counts["reference"] >= 1, counts
    for backend, args in tool.SELECTIONS.items():
        assert "-k" in args and any(a.startswith("tests/") for a in args), backend


@pytest.mark.parametrize("mutant", tool.MUTANTS, ids=lambda m: m.id)
def test_snippet_can_be_located(mutant):
    with open(os.path.join(ROOT, mutant.file), encoding="utf-8") as f:
        offset, problem = tool.locate(f.read(), mutant)
    assert offset >= 0, f"{mutant.file}: {problem}; update tools/mutation_test.py"


def test_apply_mutant_refuses_a_missing_snippet(tmp_path):
    (tmp_path / "f.py").write_text("x = 1\n")
    with pytest.raises(SystemExit, match="occurs 0 times"):
        tool.apply_mutant(str(tmp_path), tool.Mutant("m", "torch", "f.py", "y = 2", "y = 3", "d"))
    tool.apply_mutant(str(tmp_path), tool.Mutant("m", "torch", "f.py", "x = 1", "x = 2", "d"))
    assert (tmp_path / "f.py").read_text() == "x = 2\n"


def test_an_anchor_locates_a_snippet_that_occurs_more_than_once(tmp_path):
    (tmp_path / "f.py").write_text("def a():\n    x = 1\n\n\ndef b():\n    x = 1\n")
    with pytest.raises(SystemExit, match="occurs 2 times"):
        tool.apply_mutant(str(tmp_path), tool.Mutant("m", "torch", "f.py", "x = 1", "x = 2", "d"))
    with pytest.raises(SystemExit, match="anchor 'def c' occurs 0 times"):
        tool.apply_mutant(str(tmp_path), tool.Mutant("m", "torch", "f.py", "x = 1", "x = 2", "d", anchor="def c"))
    tool.apply_mutant(str(tmp_path), tool.Mutant("m", "torch", "f.py", "x = 1", "x = 2", "d", anchor="def b"))
    assert (tmp_path / "f.py").read_text() == "def a():\n    x = 1\n\n\ndef b():\n    x = 2\n"
