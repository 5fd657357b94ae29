"""The paper-reproduction example: a smoke run on synthetic data, and the corpus preparation."""
import csv
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_paper_reproduction_smoke(tmp_path):
    done = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "paper_reproduction.py"), "--synthetic",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["run"] for r in rows] == ["none", "dropout", "explicit", "implicit", "explicit+implicit"]
    for r in rows:
        assert 1.0 < float(r["best_valid_ppl"]) < 200 and float(r["test_ppl_at_best"]) > 1.0
    assert (tmp_path / "learning_curves.png").stat().st_size > 0
    assert "| explicit+implicit |" in (tmp_path / "results.md").read_text()


def test_prepare_fortunes_builds_the_ptb_layout(tmp_path):
    source = tmp_path / "fortunes"
    source.mkdir()
    text = "\n%\n".join(f"Fortune number {i}, said the cookie. It's {'good' if i % 2 else 'bad'}!" for i in range(40))
    (source / "cookie").write_text(text + "\n")
    (source / "cookie.dat").write_bytes(b"\x00\x01")  # index files are skipped
    out = tmp_path / "corpus"
    done = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "prepare_fortunes.py"), "--source",
                           str(source), "--out", str(out), "--vocab", "12"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    lines = {s: (out / f"{s}.txt").read_text().splitlines() for s in ("train", "valid", "test")}
    assert (len(lines["train"]), len(lines["valid"]), len(lines["test"])) == (32, 4, 4)
    vocab = (out / "vocab.txt").read_text().split()
    assert len(vocab) == 12 and vocab[-2:] == ["<unk>", "<eos>"]
    assert "it's" in vocab or "<unk>" in lines["train"][0]
    assert all(tok in vocab for line in lines["train"] for tok in line.split())
