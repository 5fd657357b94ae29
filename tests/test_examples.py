"""The paper-reproduction example: a smoke run on synthetic data, and the corpus preparation."""
import csv
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.cpu_only  # tests/conftest.py: skipped with DROPREG_TEST_DEVICE=cuda

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _example(name):
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    return __import__(name)


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_paper_reproduction_smoke(tmp_path):
    """Every stage on the synthetic corpus: the grid picks each method's lr by validation, the sweep reuses it,
    the main stage trains every (method, seed), measures the curvature at the best and the matched checkpoints,
    and writes the verdicts that summarize() regenerates from the CSVs."""
    done = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "paper_reproduction.py"), "--quick",
                           "--max-epochs", "2", "--lanczos-iterations", "6", "--trace-samples", "2", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    methods = ("none", "dropout", "explicit", "explicit+implicit")
    grid = _rows(tmp_path / "grid.csv")
    assert sorted((r["run"], float(r["lr"])) for r in grid) == sorted((m, lr) for m in methods for lr in (5.0, 20.0))
    chosen = {m: min((r for r in grid if r["run"] == m), key=lambda r: float(r["best_valid_ppl"]))["lr"]
              for m in methods}
    sweep = _rows(tmp_path / "sweep.csv")
    assert sorted((r["run"], r["scale"], r["lr"]) for r in sweep) == sorted(
        (m, "2.0", chosen[m]) for m in ("explicit+implicit",))
    results = _rows(tmp_path / "results.csv")
    assert sorted((r["run"], r["seed"], r["lr"]) for r in results) == sorted(
        (m, seed, chosen[m]) for m in methods for seed in "01")
    for r in results:
        assert 1.0 < float(r["best_valid_ppl"]) < 200 and float(r["test_ppl_at_best"]) > 1.0
        assert 1 <= int(r["best_epoch"]) <= int(r["epochs_run"]) <= 2
    curvature = _rows(tmp_path / "diagnostics.csv")
    assert sorted((r["checkpoint"], r["run"], r["seed"]) for r in curvature) == sorted(
        (c, m, seed) for c in ("best", "matched") for m in methods for seed in "01")
    for seed in "01":  # matched: the highest best-checkpoint loss among the methods is every run's target
        target = max(float(r["clean_train_loss_at_best"]) for r in results if r["seed"] == seed)
        assert {float(r["target_loss"]) for r in curvature if r["checkpoint"] == "matched" and r["seed"] == seed} \
            == {target}
    assert all(float(r["trace_se"]) > 0 and float(r["lanczos_residual"]) >= 0 for r in curvature)
    lines = (tmp_path / "results.md").read_text().splitlines()
    example = _example("paper_reproduction")
    assert lines == example.summarize(results, curvature, lines[2])
    assert sum(line.startswith("- ") and "adjusted p" in line for line in lines) == 4
    assert (tmp_path / "learning_curves.png").stat().st_size > 0


def test_statistics_against_published_values():
    example = _example("paper_reproduction")
    # published two-sided 95% critical values, and the CDF at them
    for df, expected in ((1, 12.706), (4, 2.776), (10, 2.228), (30, 2.042)):
        assert abs(example.t_quantile(0.975, df) - expected) < 1e-3
        assert example.t_cdf(-expected, df) == pytest.approx(0.025, abs=2e-5)
    # paired t by hand: differences -1, -1, -1, -1, -2: mean -1.2, sd 0.4472, se 0.2, t -6, df 4, p 0.003883
    mean, se, t, df, p = example.paired_test([1.0, 2.0, 3.0, 4.0, 5.0], [2.0, 3.0, 4.0, 5.0, 7.0])
    assert (mean, df) == (pytest.approx(-1.2), 4) and se == pytest.approx(0.2) and t == pytest.approx(-6.0)
    assert p == pytest.approx(0.003883, abs=2e-6)
    # far tails without cancellation (scipy.stats.t.sf), and nearly constant paired differences
    for x, df, expected in ((1e4, 4, 2.9999998e-16), (1e5, 4, 2.999999998e-20), (1e4, 1, 3.183098851e-05)):
        assert example.t_tail(x, df) == pytest.approx(expected, rel=1e-6)
    mean, se, t, df, p = example.paired_test([50.0, 60.0, 70.0, 80.0, 90.0], [40.0, 50.0, 60.0, 70.0, 80.001])
    assert p == pytest.approx(9.600768e-19, rel=1e-5)
    assert 0.0 <= example.paired_test([0.3, 0.25, 0.7, 0.9, 0.45], [0.1, 0.05, 0.5, 0.7, 0.25])[4] < 1e-10
    with pytest.raises(ValueError, match="^probability"):
        example.t_quantile(0.5, 4)
    # Holm by hand: sorted 0.005*4, 0.01*3, 0.03*2, then max(0.06, 0.04*1), back in input order
    assert example.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])


def test_verdicts_follow_the_adjusted_p_values():
    example = _example("paper_reproduction")
    values = {"none": [100.0, 102.0, 101.0, 103.0, 99.0], "dropout": [90.0, 91.5, 90.4, 92.6, 88.7],
              "explicit+implicit": [90.2, 91.0, 91.3, 92.0, 89.0], "explicit": [95.0, 96.0, 97.0, 98.0, 95.5]}
    rows = {(r["first"], r["second"]): r for r in example.compare(values, example.COMPARISONS)}
    assert rows[("dropout", "none")]["verdict"] == "dropout lower than none"
    assert rows[("explicit+implicit", "dropout")]["verdict"] == "no difference shown"
    assert rows[("explicit", "explicit+implicit")]["verdict"] == "explicit higher than explicit+implicit"
    for r in rows.values():  # Bonferroni over the four comparisons: t(1 - 0.05 / 8, df 4) = 4.3147 (scipy)
        assert (r["high"] - r["low"]) / 2 == pytest.approx(4.3147 * abs(r["difference"] / r["t"]), rel=1e-3)
        assert (r["p_holm"] < 0.05) == (r["verdict"] != "no difference shown")


@pytest.mark.slow
def test_condensation_smoke(tmp_path):
    done = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "condensation.py"), "--quick",
                           "--steps", "50", "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = _rows(tmp_path / "condensation.csv")
    assert sorted((r["method"], r["gamma"], r["seed"]) for r in rows) == sorted(
        (m, g, s) for m in ("none", "dropout") for g in ("2.0", "0.5") for s in "01")
    assert all(0.0 <= float(r["condensed"]) <= 1.0 and float(r["train_mse"]) > 0 for r in rows)
    lines = (tmp_path / "results.md").read_text().splitlines()
    assert "| 2 | dropout | 2 |" in "\n".join(lines)


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


REPRODUCTION = os.path.join(ROOT, "docs", "paper_reproduction", "v3")


def _generated_lines(text, begin="<!-- reproduction:begin -->", end="<!-- reproduction:end -->"):
    block = text.split(begin, 1)[1].split(end, 1)[0]
    return [line for line in block.splitlines() if line.startswith(("|", "- "))]


def test_committed_reproduction_regenerates_from_its_csvs():
    """results.md (tables, tests and verdicts) is what summarize() makes of the committed CSVs; the grid's chosen
    learning rates are the best on validation; the condensation table is what its CSV gives."""
    example = _example("paper_reproduction")
    lines = open(os.path.join(REPRODUCTION, "results.md")).read().splitlines()
    results, curvature = _rows(os.path.join(REPRODUCTION, "results.csv")), _rows(os.path.join(REPRODUCTION, "diagnostics.csv"))
    assert lines == example.summarize(results, curvature, lines[2])
    grid = _rows(os.path.join(REPRODUCTION, "grid.csv"))
    for method in {r["run"] for r in grid}:
        best = min((r for r in grid if r["run"] == method), key=lambda r: float(r["best_valid_ppl"]))
        assert {r["lr"] for r in results if r["run"] == method} == {best["lr"]}, method
    condensation = _example("condensation")
    rows = _rows(os.path.join(REPRODUCTION, "condensation", "condensation.csv"))
    lines = open(os.path.join(REPRODUCTION, "condensation", "results.md")).read().splitlines()
    gammas = ",".join(dict.fromkeys(r["gamma"] for r in rows))
    args = condensation.parse_args(["--gammas", gammas, "--seeds", ",".join(sorted({r["seed"] for r in rows}))])
    assert lines == condensation.summarize(rows, args, lines[2])


def test_readme_and_reproduction_page_quote_the_committed_results():
    """Every table row and verdict line between the markers in README.md and docs/reproduction.md is a line of
    a committed results file: no figure or verdict is written by hand."""
    committed = set()
    for name in ("results.md", "grid.md", "sweep.md", os.path.join("condensation", "results.md")):
        committed.update(open(os.path.join(REPRODUCTION, name)).read().splitlines())
    for page in ("README.md", os.path.join("docs", "reproduction.md")):
        quoted = _generated_lines(open(os.path.join(ROOT, page)).read())
        assert quoted, page
        missing = [line for line in quoted if line not in committed]
        assert not missing, (page, missing)
