"""The every-site training-step benchmark runs end to end (--quick, one vocabulary), so it cannot rot."""
import csv
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.cpu_only  # tests/conftest.py: skipped with DROPREG_TEST_DEVICE=cuda

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_sites_step_quick(tmp_path):
    done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "sites_step.py"), "--quick",
                           "--vocabs", "500", "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with open(tmp_path / "results.csv") as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"dropreg", "dropreg-blocks", "authors", "dropout"}
    assert all(r["status"] == "ok" and r["vocab"] == "500" and r["rows"] == "64" for r in rows.values()), rows
    table = (tmp_path / "results.md").read_text()
    assert all(f"| 500 | {method} |" in table for method in rows)
    assert (tmp_path / "time_vs_vocab.png").stat().st_size > 0


@pytest.mark.slow
def test_sites_step_interleaved_quick(tmp_path):
    done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "sites_step.py"), "--quick",
                           "--interleaved", "--vocabs", "500", "--rounds", "2", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with open(tmp_path / "interleaved.csv") as f:
        (row,) = list(csv.DictReader(f))
    assert (row["first"], row["second"], row["vocab"], row["rounds"]) == ("dropreg", "dropout", "500", "2")
    assert float(row["ratio_min"]) <= float(row["ratio"]) <= float(row["ratio_max"])
    assert "| 500 | dropreg |" in (tmp_path / "interleaved.md").read_text()
