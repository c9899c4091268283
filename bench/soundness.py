"""Is the verdict sound? Simulated experiments where the truth is known.

A/A: both arms drawn from the same per-sample outcome distribution, so any winner called is a
false alarm (must be <= 5% of trials). Power: the challenger is truly +5 F1 points better (must be
found in >= 90% of trials). Both at n = 500 samples, 1,000 trials, with the verdict's own rules
(close_margin 3 points, 2,000 resamples); the targets are set to zero so that only the
statistics decide.

The per-sample outcome model: each sample holds Poisson(3) gold entities (the same samples for
both arms); an arm finds each with probability ``recall`` and invents Poisson(g * recall *
(1 - precision) / precision) extra ones, which gives the wanted expected precision.

    .venv/bin/python bench/soundness.py              # the two checks, 1,000 trials each
    .venv/bin/python bench/soundness.py --table      # also a grid of sample sizes and effects
Prints a table and writes bench/out/soundness.json.
"""

from __future__ import annotations

import argparse
import json
import dataclasses
import time
from pathlib import Path

import numpy as np

from gputwin.core.profiles import Rules
from gputwin.core.verdict import A, C, ArmResult, decide

BASE = (0.80, 0.80)  # (recall, precision): F1 0.80
MEAN_ENTITIES = 3.0


def simulate_arm(rng: np.random.Generator, gold: np.ndarray, recall: float, precision: float) -> np.ndarray:
    """Per-sample [tp, fp, fn] of one arm on samples with ``gold`` entities each."""
    tp = rng.binomial(gold, recall)
    fp = rng.poisson(gold * recall * (1 - precision) / precision)
    return np.stack([tp, fp, gold - tp], axis=1)


def challenger_for(effect: float) -> tuple[float, float]:
    """Recall and precision both raised by ``effect``: F1 rises by exactly ``effect`` (P = R)."""
    return BASE[0] + effect, BASE[1] + effect


def soundness_rules(resamples: int = 2000) -> Rules:
    return Rules(baseline="base", target_f1=0.0, target_recall=0.0, bootstrap_resamples=resamples)


def run_trials(effect: float, n: int, trials: int, *, seed: int = 0, resamples: int = 2000) -> dict[str, float]:
    """Share of trials where a winner was called, and (effect > 0) where it was the challenger."""
    rng = np.random.default_rng(seed)
    rules = soundness_rules(resamples)
    called = right = 0
    for trial in range(trials):
        gold = rng.poisson(MEAN_ENTITIES, n)
        base = simulate_arm(rng, gold, *BASE)
        challenger = simulate_arm(rng, gold, *challenger_for(effect))
        arms = {name: ArmResult(step=100, validation={"per_sample": counts.tolist()})
                for name, counts in (("base", base), ("challenger", challenger))}
        verdict = decide(arms, dataclasses.replace(rules, seed=trial))
        if verdict.scenario in (A, C):
            called += 1
            right += verdict.winner == "challenger"
    return {"effect": effect, "n": n, "trials": trials, "called": called / trials,
            "right": right / trials if effect > 0 else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=1000)
    parser.add_argument("--table", action="store_true", help="also sweep sample sizes and effects")
    args = parser.parse_args()
    cells = [(0.0, 500), (0.05, 500)]
    if args.table:
        cells += [(e, n) for n in (100, 250, 1000) for e in (0.0, 0.03, 0.05, 0.08)] + [(0.03, 500), (0.08, 500)]
    started = time.perf_counter()
    rows = [run_trials(effect, n, args.trials, seed=i) for i, (effect, n) in enumerate(cells)]
    seconds = time.perf_counter() - started
    print(f"{'effect (F1 points)':>18} {'n':>6} {'trials':>7} {'winner called':>14} {'right winner':>13}")
    for r in rows:
        right = "-" if r["right"] is None else f"{r['right']:.1%}"
        print(f"{r['effect'] * 100:>+18.0f} {r['n']:>6} {r['trials']:>7} {r['called']:>14.1%} {right:>13}")
    false_alarms, power = rows[0]["called"], rows[1]["right"]
    checks = {"false_alarms_at_most_5pct": false_alarms <= 0.05, "power_at_least_90pct": power >= 0.90}
    print(f"A/A false alarms at n=500: {false_alarms:.1%} (must be <= 5%); "
          f"+5 points found at n=500: {power:.1%} (must be >= 90%); {seconds:.1f} s")
    out = Path(__file__).parent / "out"
    out.mkdir(exist_ok=True)
    (out / "soundness.json").write_text(json.dumps({"rows": rows, "checks": checks, "seconds": seconds}, indent=2) + "\n")
    print(f"wrote {out / 'soundness.json'}")
    raise SystemExit(0 if all(checks.values()) else 1)


if __name__ == "__main__":
    main()
