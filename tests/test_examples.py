"""The paper-reproduction example: a smoke run on synthetic data, and the corpus preparation."""
import csv
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.cpu_only  # tests/conftest.py: skipped with DROPREG_TEST_DEVICE=cuda

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_paper_reproduction_smoke(tmp_path):
    done = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "paper_reproduction.py"), "--quick",
                           "--epochs", "1", "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    # one row per (run, seed); the rows come in the order the jobs were submitted (costliest runs first)
    assert sorted((r["run"], r["seed"]) for r in rows) == sorted(
        (run, seed) for seed in "01" for run in ("none", "dropout", "explicit", "explicit+implicit"))
    for r in rows:
        assert 1.0 < float(r["best_valid_ppl"]) < 200 and float(r["test_ppl_at_best"]) > 1.0
        assert float(r["trace"]) != 0 and 0.0 <= float(r["condensation"]) <= 1.0
    assert (tmp_path / "learning_curves.png").stat().st_size > 0
    with open(tmp_path / "curves.csv") as f:  # --epochs 1 wins over --quick's default of 2
        assert {r["epoch"] for r in csv.DictReader(f)} == {"1"}
    table = (tmp_path / "results.md").read_text()
    assert "| explicit+implicit | 2 |" in table and "- dropout - none:" in table


def test_student_t_quantiles_and_welch_interval():
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    from paper_reproduction import t_quantile, welch_interval
    # published two-sided 95% critical values
    for df, expected in ((1, 12.706), (4, 2.776), (10, 2.228), (30, 2.042)):
        assert abs(t_quantile(0.975, df) - expected) < 1e-3
    diff, low, high = welch_interval([1.0, 2.0, 3.0, 4.0, 5.0], [2.0, 3.0, 4.0, 5.0, 7.0])
    # by hand: diff -1.2, se sqrt(2.5/5 + 3.7/5) = 1.1136, Welch df 7.711, t(0.975, 7.711) = 2.3211 -> 2.5847
    assert diff == pytest.approx(-1.2) and (high - low) / 2 == pytest.approx(2.5847, abs=2e-3)


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


def test_hf_finetune_smoke(tmp_path):
    """examples/hf_finetune.py end to end on a tiny synthetic corpus: pretraining, then both fine-tuning arms."""
    pytest.importorskip("transformers")
    source = tmp_path / "fortunes"
    source.mkdir()
    text = "\n%\n".join(f"Fortune number {i % 7}, said the cookie {i % 5}. It's {'good' if i % 2 else 'bad'}!"
                        for i in range(400))
    (source / "cookie").write_text(text + "\n")
    corpus, out = tmp_path / "corpus", tmp_path / "out"
    done = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "prepare_fortunes.py"), "--source",
                           str(source), "--out", str(corpus), "--vocab", "30"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    done = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "hf_finetune.py"), "--data", str(corpus),
                           "--out", str(out), "--pretrain-steps", "4", "--steps", "4", "--length", "16", "--batch", "4",
                           "--hidden", "32", "--finetune-blocks", "8", "--valid-blocks", "4", "--log-every", "2",
                           "--eval-every", "2"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    with open(out / "log.csv") as f:
        rows = list(csv.DictReader(f))
    finals = {r["arm"]: float(r["value"]) for r in rows if r["metric"] == "final_eval_loss"}
    assert set(finals) == {"pretrain", "hf", "dropreg"} and all(0 < v < 10 for v in finals.values())
    assert {r["arm"] for r in rows if r["metric"] == "eval_loss"} == {"pretrain", "hf", "dropreg"}
    summary = (out / "summary.md").read_text()
    assert "| dropreg |" in summary and "| 4 |" in summary
