"""eval's length-controlled win rate vs the raw win rate and AlpacaEval's, on synthetic preferences of known truth.

    python bench/length_control.py [--alpaca-eval-python /tmp/ae-venv/bin/python]

The preferences come from `synthetic()` in tests/test_length_control.py (a length-biased judge, true rate 31.0).
Prints, per prompt count, the mean over seeds of: the raw win rate, iterdpo's LC rate and its standard error, the
test's reference implementation of AlpacaEval's `length_controlled_minimal` and, with --alpaca-eval-python (an
interpreter of a separate environment with alpaca_eval installed; it conflicts with ours), AlpacaEval's own
`get_length_controlled_winrate` (its download of instruction difficulties, unused by that formula, is stubbed).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from builders.evaluate import length_controlled  # noqa: E402
from tests.test_length_control import TRUE_RATE, alpaca_eval_minimal, synthetic  # noqa: E402

ALPACA_EVAL = r"""
import json, logging, sys, tempfile
import pandas as pd
import alpaca_eval.metrics.glm_winrate as g
logging.disable(logging.WARNING)
tmp = tempfile.mkdtemp()
pd.DataFrame({"index": range(1000), "instruction_difficulty": 0.0, "model": "x", "preference": 1.5,
              "std_delta_len": 0.0, "not_gamed_baseline": False}).to_csv(f"{tmp}/df_gamed.csv", index=False)
g.hf_hub_download = lambda **kw: f"{tmp}/df_gamed.csv"
out = []
for r in json.load(open(sys.argv[1])):
    ann = pd.DataFrame({"preference": [2.0 if p == 1 else 1.0 if p == 0 else 1.5 for p in r["prefs"]],
                        "output_1": ["x" * 5000] * len(r["prefs"]),
                        "output_2": ["x" * int(5000 + round(d)) for d in r["diffs"]],
                        "index": range(len(r["prefs"])), "generator_1": "ref", "generator_2": "model"})
    m = g.get_length_controlled_winrate(ann, glm_name="length_controlled_minimal", save_weights_dir=None)
    out.append(m["length_controlled_winrate"] / 100)
print(json.dumps(out))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--alpaca-eval-python", default=None)
    ap.add_argument("--sizes", default="10:20,50:20,805:5", help="prompts:seeds,...")
    args = ap.parse_args()
    runs = []
    for spec in args.sizes.split(","):
        n, seeds = map(int, spec.split(":"))
        for seed in range(seeds):
            prefs, diffs = synthetic(n, 1000 * n + seed)
            lc = length_controlled(prefs, diffs)
            runs.append(
                {
                    "n": n,
                    "prefs": prefs,
                    "diffs": diffs,
                    "raw": float(np.mean(prefs)),
                    "lc": lc.win_rate,
                    "se": lc.standard_error,
                    "reference": alpaca_eval_minimal(prefs, diffs),
                }
            )
    if args.alpaca_eval_python:
        with (
            tempfile.NamedTemporaryFile("w", suffix=".json") as f,
            tempfile.NamedTemporaryFile("w", suffix=".py") as script,
        ):
            json.dump(runs, f)
            f.flush()
            script.write(ALPACA_EVAL)
            script.flush()
            done = subprocess.run(
                [args.alpaca_eval_python, script.name, f.name], capture_output=True, text=True, check=True
            )
        for r, v in zip(runs, json.loads(done.stdout.strip().splitlines()[-1])):
            r["alpaca_eval"] = v
    truth = 100 * TRUE_RATE
    print(f"true rate {truth:.1f}")
    for n in dict.fromkeys(r["n"] for r in runs):
        group = [r for r in runs if r["n"] == n]

        def mean(key, err=False, group=group):
            return np.mean([abs(100 * r[key] - truth) if err else 100 * r[key] for r in group])

        line = (
            f"n={n:>4} ({len(group)} seeds): raw {mean('raw'):.1f}, "
            f"iterdpo LC {mean('lc'):.1f} +/- {mean('se'):.1f}, reference {mean('reference'):.1f}"
        )
        if args.alpaca_eval_python:
            worst = max(abs(100 * (r["lc"] - r["alpaca_eval"])) for r in group)
            line += f", alpaca_eval {mean('alpaca_eval'):.1f} (max |iterdpo - alpaca_eval| {worst:.2f})"
        line += f" | mean |error|: raw {mean('raw', True):.1f}, iterdpo {mean('lc', True):.1f}"
        line += f", alpaca_eval {mean('alpaca_eval', True):.1f}" if args.alpaca_eval_python else ""
        print(line)


if __name__ == "__main__":
    main()
