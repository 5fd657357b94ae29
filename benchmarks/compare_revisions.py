"""Forward+backward time of the same calls in two revisions of dropreg, interleaved: each round runs one process per
revision (the order alternates between rounds), every process times every case, and each round gives the ratio
new / base measured within a minute. The median of the per-round ratios answers "did this change slow a step down",
to a few percent on a noisy 2-core machine.

    python benchmarks/compare_revisions.py --base 0fd796f --new HEAD --rounds 8 \
        --out docs/benchmarks/redesign_interleaved

Each revision is exported with ``git archive`` into a temporary folder and imported from there (PYTHONPATH); when
csrc/ is the same in both, the C++ library built in this checkout (``dropreg/_C*.so``) is copied into both, so the
two run the same kernels, else each JIT-builds its own. Writes ``rounds.csv`` and ``results.md``.
"""
from __future__ import annotations

import argparse
import csv
import glob
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name -> keyword arguments of dropreg.linear_cross_entropy (p=0.1 default: both terms)
CASES = {
    "cpu/fused": dict(backend="cpu"),
    "cpu/ce-only": dict(backend="cpu", explicit=False, implicit=False),
    "torch/fused": dict(backend="torch"),
    "torch/ce-only": dict(backend="torch", explicit=False, implicit=False),
}

# Runs inside each revision's process: prints {case: seconds} (the fastest of --repeats calls after one warm-up).
_TIMER = r"""
import json, sys, time, torch
import dropreg
args = json.loads(sys.argv[1])
torch.set_num_threads(args["threads"])
gen = torch.Generator().manual_seed(0)
n, d, v = args["rows"], args["dim"], args["vocab"]
h = torch.randn(n, d, generator=gen).requires_grad_()
w = (torch.randn(v, d, generator=gen) / d ** 0.5).requires_grad_()
y = torch.randint(0, v, (n,), generator=gen)
times = {}
for name in args["cases"]:
    kwargs = args["all_cases"][name]
    best = float("inf")
    for call in range(1 + args["repeats"]):
        h.grad = w.grad = None
        start = time.perf_counter()
        dropreg.linear_cross_entropy(h, w, y, seed=1, **kwargs).loss.backward()
        if call:
            best = min(best, time.perf_counter() - start)
    times[name] = best
print(json.dumps(times))
"""


# Imported first in each revision's process (its tree is on PYTHONPATH): an editable install of dropreg maps
# dropreg._C to this checkout's build, which would shadow the revision's own kernels.
_SITECUSTOMIZE = """import sys
sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
"""


def export(revision: str, folder: str, library: list[str]) -> str:
    tree = os.path.join(folder, revision.replace("/", "_"))
    os.makedirs(tree)
    archive = subprocess.run(["git", "archive", revision], cwd=REPO, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", tree], input=archive, check=True)
    with open(os.path.join(tree, "sitecustomize.py"), "w") as f:
        f.write(_SITECUSTOMIZE)
    for path in library:
        shutil.copy(path, os.path.join(tree, "dropreg"))
    return tree


def same_kernels(base: str, new: str) -> bool:
    return subprocess.run(["git", "diff", "--quiet", base, new, "--", "csrc", "dropreg/_build.py"],
                          cwd=REPO).returncode == 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True)
    parser.add_argument("--new", default="HEAD")
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--cases", type=lambda s: s.split(","), default=list(CASES))
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    revisions = {}
    for label in ("base", "new"):
        revisions[label] = subprocess.run(["git", "rev-parse", "--short", getattr(args, label)], cwd=REPO,
                                          check=True, capture_output=True, text=True).stdout.strip()
    library = glob.glob(os.path.join(REPO, "dropreg", "_C*.so")) if same_kernels(*revisions.values()) else []
    settings = dict(rows=args.rows, dim=args.dim, vocab=args.vocab, threads=args.threads, repeats=args.repeats,
                    cases=args.cases, all_cases=CASES)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        trees = {label: export(rev, folder, library) for label, rev in revisions.items()}
        for round_index in range(args.rounds):
            order = ("base", "new") if round_index % 2 == 0 else ("new", "base")
            measured = {}
            for label in order:
                env = dict(os.environ, PYTHONPATH=trees[label], OMP_NUM_THREADS=str(args.threads),
                           TORCH_EXTENSIONS_DIR=os.path.join(folder, f"extensions_{label}"))  # one JIT build each
                out = subprocess.run([sys.executable, "-c", _TIMER, json.dumps(settings)], cwd=trees[label], env=env,
                                     check=True, capture_output=True, text=True).stdout
                measured[label] = json.loads(out.strip().splitlines()[-1])
            for case in args.cases:
                ratio = measured["new"][case] / measured["base"][case]
                rows.append(dict(round=round_index, case=case, base_s=measured["base"][case],
                                 new_s=measured["new"][case], ratio=ratio))
                print(f"round {round_index} {case}: base {measured['base'][case]:.3f} s, new "
                      f"{measured['new'][case]:.3f} s, ratio {ratio:.3f}", flush=True)
    lines = [f"# {revisions['new']} against {revisions['base']}, interleaved", "",
             f"N={args.rows}, d={args.dim}, V={args.vocab}, fp32, {args.threads} threads, {args.rounds} rounds "
             f"(one process per revision and round, order alternating), each case the fastest of {args.repeats} "
             f"forward+backward calls after a warm-up; kernels {'shared' if library else 'built per revision'}.", "",
             "| case | base median s | new median s | median of per-round ratios new/base |", "|---|---|---|---|"]
    for case in args.cases:
        of_case = [r for r in rows if r["case"] == case]
        lines.append(f"| {case} | {statistics.median(r['base_s'] for r in of_case):.3f} | "
                     f"{statistics.median(r['new_s'] for r in of_case):.3f} | "
                     f"{statistics.median(r['ratio'] for r in of_case):.3f} |")
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "rounds.csv"), "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        with open(os.path.join(args.out, "results.md"), "w") as f:
            f.write(report)


if __name__ == "__main__":
    main()
