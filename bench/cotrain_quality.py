"""Co-trained against separate: each arm's milestone F1, held against the run-to-run noise of separate training.

One experiment run twice on one GPU, the same arms and seeds both times: first every arm in a process of its
own (`[placement] cotrain = "off"`), then every arm in one process (`"on"`). `--replicates N` adds N runs of
each arm with the next seeds (rules.replicates), so that each arm has several seeds in each placement. Each
run goes as far as the milestone: every arm's validation there (and the cooldown probe's, where one runs),
then every arm is stopped.

For each arm and seed it reports the milestone F1 both ways and their difference; for each arm, the spread of
its F1 across seeds when trained apart (the run-to-run noise) and the mean co-trained-minus-separate
difference; and the loss curves' largest gap (EMA-smoothed, the steps both runs logged). Co-training passes
when every arm's mean difference is inside the spread of its separate seeds.

  python3 bench/cotrain_quality.py seed --model /tmp/smollm2-135m-instruct --data bench/out/seed-e2e --replicates 2
        (GPU) the seed's two profiles, both arms on GPU 0, with a real pretrained model
  python bench/cotrain_quality.py smoke --work DIR     (tests) the demo's arms at toy sizes on the CPU
Writes bench/results/cotrain_quality_TAG.json (or WORK/cotrain_quality_TAG.json) and prints a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "bench"))

import torch  # noqa: E402

import common  # noqa: E402
import decisions  # noqa: E402
from gputwin.control import launcher  # noqa: E402
from gputwin.core.events import read_events  # noqa: E402
from gputwin.core.paths import ExperimentPaths  # noqa: E402
from gputwin.core.profiles import Experiment, with_replicates  # noqa: E402
from gputwin.faces.report import load_state  # noqa: E402

PLACEMENTS = ("off", "on")


def placed(experiment: Experiment, cotrain: str, name: str) -> Experiment:
    return dataclasses.replace(experiment, name=name,
                               placement=dataclasses.replace(experiment.placement, cotrain=cotrain))


def milestone_reached(exp: ExperimentPaths) -> bool:
    """Every arm has validated at its milestone (and finished the probe that follows, where one runs), or ended."""
    state = load_state(exp, time.time())
    for arm in state.arms.values():
        if arm.status == "crashed":
            raise RuntimeError(f"{arm.name} crashed; see {exp.root / arm.name}")
        milestone = arm.milestone_step
        point = arm.validation_at(milestone) if milestone else None
        probing = point is not None and (point.schedule or {}).get("probe_steps")
        if point is None or (probing and arm.probe_at(milestone) is None):
            if not arm.ended:
                return False
    return True


def read_arm(folder: Path) -> dict[str, Any]:
    events = read_events(folder / "events.jsonl").events
    started = next(e for e in events if e.get("kind") == "started")
    milestone = started.get("milestone_step")
    validation = next((e for e in events if e.get("kind") == "validation" and e.get("step") == milestone), None)
    probe = next((e for e in events if e.get("kind") == "probe" and e.get("step") == milestone), None)
    losses = {e["step"]: e["loss"] for e in events if e.get("kind") == "step" and e.get("loss") is not None
              and e["step"] <= (milestone or 0)}
    return {"milestone_step": milestone, "shares_process_with": started.get("shares_process_with", []),
            "f1": None if validation is None else validation.get("f1"),
            "precision": None if validation is None else validation.get("precision"),
            "recall": None if validation is None else validation.get("recall"),
            "probe_f1": None if probe is None else probe.get("f1"), "losses": losses}


def run_once(experiment: Experiment, logs: Path, limit: float) -> dict[str, Any]:
    launched = time.time()
    exp = launcher.start_experiment(experiment, root=logs, say=print)
    seconds = decisions.wait_until(lambda: milestone_reached(exp), limit, f"{experiment.name}: every milestone")
    for name in experiment.arm_names:
        if not load_state(exp, time.time()).arms[name].ended:
            launcher.request_stop(exp, name, by="bench")
    decisions.wait_until(lambda: all(a.ended for a in load_state(exp, time.time()).arms.values()), limit,
                         f"{experiment.name}: every arm to stop")
    arms = {name: read_arm(exp.root / name) for name in experiment.arm_names}
    print(f"{experiment.name}: every milestone after {seconds:.1f} s: "
          + ", ".join(f"{n} F1 {decisions.f3(a['f1'])}" for n, a in arms.items()))
    return {"cotrain": experiment.placement.cotrain, "milestones_after_s": round(seconds, 1),
            "total_s": round(time.time() - launched, 1), "logs": str(exp.root), "arms": arms}


def compare(runs: dict[str, dict[str, Any]], experiment: Experiment) -> dict[str, Any]:
    """Per arm and seed: F1 both ways; per arm: the separate seeds' spread against the mean difference."""
    apart, together = runs["off"]["arms"], runs["on"]["arms"]
    groups: dict[str, list[str]] = {}
    for arm in experiment.arms:
        groups.setdefault(arm.replicate_of or arm.name, []).append(arm.name)
    rows, arms = [], {}
    for base, names in groups.items():
        diffs, separate_f1 = [], []
        for name in names:
            a, b = apart[name], together[name]
            gap = common.curve_gap([a["losses"][s] for s in sorted(a["losses"]) if s in b["losses"]],
                                   [b["losses"][s] for s in sorted(a["losses"]) if s in b["losses"]])
            diff = None if a["f1"] is None or b["f1"] is None else b["f1"] - a["f1"]
            rows.append({"arm": name, "separate_f1": a["f1"], "cotrained_f1": b["f1"], "difference": diff,
                         "separate_probe_f1": a["probe_f1"], "cotrained_probe_f1": b["probe_f1"],
                         "max_rel_gap_ema": gap.get("max_rel_gap_ema"), "steps_compared": gap.get("steps")})
            if diff is not None:
                diffs.append(diff)
                separate_f1.append(a["f1"])
        spread = max(separate_f1) - min(separate_f1) if len(separate_f1) > 1 else None
        mean_diff = statistics.fmean(diffs) if diffs else None
        arms[base] = {"seeds": len(names), "separate_f1_spread": spread,
                      "separate_f1_stdev": statistics.stdev(separate_f1) if len(separate_f1) > 1 else None,
                      "mean_difference": mean_diff, "paired_95": paired_interval(diffs),
                      "within_noise": None if spread is None or mean_diff is None else abs(mean_diff) <= spread}
    return {"rows": rows, "arms": arms}


T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262)  # Student's t, 97.5%, 1-9 degrees of freedom


def paired_interval(diffs: list[float]) -> list[float] | None:
    """95% interval of the mean co-trained - separate difference over seeds (paired t); None under 2 seeds.
    It asks a sharper question than the spread: whether co-training shifts an arm's F1 at all."""
    if len(diffs) < 2:
        return None
    t = T_975[min(len(diffs) - 2, len(T_975) - 1)]  # beyond 10 seeds: 2.262, a little wide
    half = t * statistics.stdev(diffs) / len(diffs) ** 0.5
    mean = statistics.fmean(diffs)
    return [mean - half, mean + half]


def print_summary(result: dict[str, Any]) -> None:
    common.print_table("milestone F1, separate processes against one co-trained process (same seeds)",
                       result["comparison"]["rows"],
                       ["arm", "separate_f1", "cotrained_f1", "difference", "separate_probe_f1", "cotrained_probe_f1",
                        "max_rel_gap_ema", "steps_compared"])
    common.print_table("per arm: the run-to-run noise of separate training against the co-trained difference",
                       [{"arm": k, **v, "paired_95": "-" if not v["paired_95"] else
                         "[{:+.4f}, {:+.4f}]".format(*v["paired_95"])} for k, v in result["comparison"]["arms"].items()],
                       ["arm", "seeds", "separate_f1_spread", "separate_f1_stdev", "mean_difference", "paired_95",
                        "within_noise"])
    for cotrain, run in result["runs"].items():
        print(f"cotrain={cotrain}: every milestone {run['milestones_after_s']} s after launch")


def smoke_experiment(work: Path) -> Experiment:
    """The seed's profiles at toy sizes on the CPU: a 2-layer random model, milestone at step 8 on 16 samples."""
    import seed_e2e

    seed_e2e.prepare(train=64, test=40, vocab=1000, work=work)
    seed_e2e.random_model(work / "model-tiny", tiny=True, work=work)
    experiment = decisions.seed_experiment(work / "model-tiny", work, "pii-seed-quality")
    arms = tuple(dataclasses.replace(
        a, device=None, model=dataclasses.replace(a.model, dtype="fp32"),
        milestone=dataclasses.replace(a.milestone, step=8, sample_size=16)) for a in experiment.arms)
    return dataclasses.replace(experiment, arms=arms)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("target", choices=["seed", "smoke"])
    parser.add_argument("--work", type=Path, default=None, help="logs and the result (default: a temporary folder, "
                        "the result in bench/results/)")
    parser.add_argument("--model", type=Path, help="seed: the model folder (e.g. /tmp/smollm2-135m-instruct)")
    parser.add_argument("--data", type=Path, help="seed: a folder with train.jsonl and test.jsonl")
    parser.add_argument("--replicates", type=int, default=2, help="more seeds of each arm (rules.replicates)")
    parser.add_argument("--tag", default=None, help="names the result file (default: the target)")
    parser.add_argument("--limit", type=float, default=900, help="seconds to wait for each run's milestones")
    args = parser.parse_args()
    work, logs = decisions.work_folders(args.work, "cotrain-quality")
    experiment = (decisions.seed_from_args(parser, args, "pii-seed-quality") if args.target == "seed"
                  else smoke_experiment(work))
    experiment = with_replicates(experiment, args.replicates)
    device = torch.device("cpu" if args.target == "smoke" else "cuda")
    runs = {cotrain: run_once(placed(experiment, cotrain, f"{experiment.name}-cotrain-{cotrain}"), logs, args.limit)
            for cotrain in PLACEMENTS}
    result = {"target": args.target, "replicates": args.replicates, "arms": experiment.arm_names, "runs": runs,
              "comparison": compare(runs, experiment), "machine": common.machine_info(device)}
    print_summary(result)
    tag = args.tag or args.target
    out = (work if args.work else REPO / "bench" / "results") / f"cotrain_quality_{tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
