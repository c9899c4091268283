"""Following the milestone verdict against letting every arm finish: what a user keeps by acting on it.

Runs an experiment to the end twice over, in one pass:
  1. every arm trains to the end of its own schedule (the milestone verdict is read from the files as it
     formed: the same decide() the UI and `gputwin status` use, on the milestone validations and probes);
  2. then the verdict's actions are followed from there: a stopped arm keeps its milestone adapter, an
     extended arm is extended (`gputwin extend`, from its final checkpoint) and trained to its new end.
It reports the F1 of the arm the user ends up with when following the verdict against the best F1 any arm
reaches when all finish, whether the verdict stopped the arm that would have ended best, and what the
raw milestone scores alone (no cooldown probe, no schedule positions: the old rule) would have recommended.

  python bench/decisions.py demo                              the embedded CPU demo (a few minutes on 2 cores)
  python3 bench/decisions.py seed --model DIR --data DIR      (GPU) the seed profiles, both arms on GPU 0
  python bench/decisions.py smoke --work DIR                  (tests) the demo's path at toy sizes
Writes bench/results/decisions_TAG.json (or WORK/decisions_TAG.json) and prints a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from gputwin.control import launcher
from gputwin.core.paths import ExperimentPaths  # noqa: E402
from gputwin.core.profiles import Experiment, load_experiment  # noqa: E402
from gputwin.faces.report import load_state  # noqa: E402
from gputwin.reading.results import collect  # noqa: E402
from gputwin.core.verdict import EXTEND, STOP, ArmResult, account_for_ended, decide  # noqa: E402

RESULTS = REPO / "bench" / "results"


def wait_until(predicate: Any, limit: float, what: str) -> float:
    started = time.time()
    while not predicate():
        if time.time() - started > limit:
            raise TimeoutError(f"{what}: not within {limit:.0f} s")
        time.sleep(0.5)
    return time.time() - started


def ended(exp: ExperimentPaths, arms: list[str] | None = None) -> bool:
    state = load_state(exp, time.time())
    chosen = [state.arms[a] for a in (arms or state.arms)]
    return all(a.ended and a.status == "finished" for a in chosen) or any(a.status == "crashed" for a in chosen)


def state_now(exp: ExperimentPaths) -> Any:
    return load_state(exp, time.time())


def final_f1(exp: ExperimentPaths) -> dict[str, dict[str, Any]]:
    """Each arm's validation at the step it ended on."""
    state = load_state(exp, time.time())
    out = {}
    for name, arm in state.arms.items():
        point = arm.validation_at(arm.step)
        out[name] = {"step": arm.step, "f1": None if point is None else point.f1,
                     "precision": None if point is None else point.precision,
                     "recall": None if point is None else point.recall, "status": arm.status}
    return out


def raw_only(results: dict[str, ArmResult | None]) -> dict[str, ArmResult | None]:
    """The milestone results as the old rule saw them: raw scores, no schedule positions."""
    return {name: None if r is None else dataclasses.replace(
        r, cooled=None, validation={k: v for k, v in r.validation.items() if k != "schedule"})
        for name, r in results.items()}


def run(experiment: Experiment, logs: Path, limit: float) -> dict[str, Any]:
    launched = time.time()
    exp = launcher.start_experiment(experiment, root=logs, say=print)
    state = load_state(exp, time.time())
    milestone_at = wait_until(lambda: all(r is not None for r in collect(load_state(exp, time.time()), time.time())[0].values()),
                              limit, "milestone verdict")
    state = load_state(exp, time.time())
    results, _ = collect(state, time.time())
    # what the screen showed then: the arms that had ended by the verdict (a finished arm that should
    # "continue" is extended while the other trains on)
    ended_then = {name: arm.status for name, arm in state.arms.items() if arm.ended}
    verdict = account_for_ended(decide(results, experiment.rules, replicate_of=state.replicate_of), ended_then,
                                extend_epochs=experiment.rules.extend_epochs)
    old = decide(raw_only(results), experiment.rules, replicate_of=state.replicate_of)
    print(f"milestone verdict after {milestone_at:.1f} s: {verdict.headline}")
    print(f"  the raw scores alone (old rule): {old.headline}")
    wait_until(lambda: ended(exp), limit, "every arm to finish")
    finished = final_f1(exp)
    all_done_s = time.time() - launched
    print("every arm ended: " + ", ".join(f"{n} {r['status']}, F1 {f3(r['f1'])} at step {r['step']}"
                                          for n, r in finished.items()))

    # follow from here: stopped arms keep their milestone adapter; extended arms train on (each extension
    # that either the verdict or the raw rule asks for runs once; both outcomes are read from it)
    wanted = {a.arm: a.epochs for v in (verdict, old) for a in v.actions if a.kind == EXTEND}
    targets = {}
    for name, epochs in wanted.items():
        arm = state_now(exp).arms[name]
        targets[name] = arm.step + epochs * (arm.steps_per_epoch or 0)
        print(launcher.request_extend(exp, name, epochs, by="bench"))

    def extensions_done() -> bool:
        arms = state_now(exp).arms
        return all((arms[n].status == "finished" and arms[n].step >= end and arms[n].validation_at(end) is not None)
                   or arms[n].status == "crashed" for n, end in targets.items())

    if targets:
        wait_until(extensions_done, limit, "the extended arms")
    after = final_f1(exp)
    new_rule = follow(verdict, results, finished, after)
    raw_rule = follow(old, results, finished, after)
    best_end = max(finished, key=lambda n: finished[n]["f1"] or -1)
    state = load_state(exp, time.time())
    probes = {n: {"steps": p.steps, "seconds": p.seconds, "f1": p.f1} for n, a in state.arms.items() for p in a.probes}
    return {
        "experiment": experiment.name, "logs": str(exp.root),
        "milestone_verdict": {"scenario": verdict.scenario, "headline": verdict.headline,
                              "actions": [a.describe() for a in verdict.actions], "reasons": list(verdict.reasons)},
        "raw_rule_verdict": {"scenario": old.scenario, "headline": old.headline,
                             "actions": [a.describe() for a in old.actions]},
        "milestone_scores": {n: {"raw_f1": r.validation.get("f1"), "cooled_f1": r.cooled.validation.get("f1") if r.cooled else None,
                                 "lr_fraction": r.lr_fraction} for n, r in results.items() if r is not None},
        "probes": probes,
        "all_finish": finished, "best_arm_at_the_end": best_end, "best_f1_all_finish": finished[best_end]["f1"],
        "followed": new_rule, "raw_rule_followed": raw_rule,
        "kept_minus_best": new_rule["kept_f1"] - finished[best_end]["f1"],
        "raw_rule_kept_minus_best": raw_rule["kept_f1"] - finished[best_end]["f1"],
        "seconds": {"milestone_verdict": round(milestone_at, 1), "all_finished": round(all_done_s, 1),
                    "total": round(time.time() - launched, 1)},
    }


def follow(verdict: Any, results: dict[str, ArmResult | None], finished: dict[str, Any],
           after: dict[str, Any]) -> dict[str, Any]:
    """Where each arm ends when the verdict's actions are followed, and the arm the user keeps."""
    arms = {name: dict(r) for name, r in finished.items()}
    stopped = [a.arm for a in verdict.actions if a.kind == STOP]
    for action in verdict.actions:
        if action.kind == STOP:
            r = results[action.arm]
            arms[action.arm] = {"step": r.step, "f1": r.validation["f1"], "status": "stopped at the milestone"}
        elif action.kind == EXTEND:
            arms[action.arm] = {**after[action.arm], "status": f"extended by {action.epochs} epoch(s)"}
    kept = {n: r for n, r in arms.items() if n not in stopped and r["f1"] is not None}
    keep = max(kept, key=lambda n: kept[n]["f1"])
    return {"arms": arms, "stopped": stopped, "kept_arm": keep, "kept_f1": kept[keep]["f1"],
            # the decision that matters: did an arm it stopped end (left alone) above what following it kept?
            "stopped_an_arm_that_ends_better": any((finished[n]["f1"] or 0) > kept[keep]["f1"] for n in stopped)}


def demo_experiment(logs: Path, *, tiny: bool) -> Experiment:
    experiment = launcher.demo_experiment(root=logs)
    if not tiny:
        return experiment
    arms = tuple(dataclasses.replace(
        a, data=dataclasses.replace(a.data, synth_train=64, synth_test=40),
        milestone=dataclasses.replace(a.milestone, sample_size=16)) for a in experiment.arms)
    return dataclasses.replace(experiment, arms=arms)


def seed_experiment(model: Path, data: Path, name: str) -> Experiment:
    """The seed's two profiles unchanged but for the model, the data folder and both arms on GPU 0."""
    experiment = load_experiment(REPO / "profiles" / "seed.toml", check_files=False)
    arms = tuple(dataclasses.replace(
        a, device=0, model=dataclasses.replace(a.model, base=str(model)),
        data=dataclasses.replace(a.data, train=str(data / "train.jsonl"), test=str(data / "test.jsonl")))
        for a in experiment.arms)
    return dataclasses.replace(experiment, name=name, arms=arms)


def work_folders(work: Path | None, what: str) -> tuple[Path, Path]:
    """The work folder (a new one under /tmp unless given) and its logs folder."""
    work = (work or Path(f"/tmp/gputwin-{what}-{int(time.time())}")).resolve()
    (work / "logs").mkdir(parents=True, exist_ok=True)
    return work, work / "logs"


def seed_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace, name: str) -> Experiment:
    if not (args.model and args.data):
        parser.error("seed needs --model and --data")
    return seed_experiment(args.model.resolve(), args.data.resolve(), name)


def f3(value: Any) -> str:
    return "-" if value is None else f"{value:.3f}"


def print_summary(result: dict[str, Any]) -> None:
    print(f"\n{'arm':20} {'raw F1 @ms':>10} {'cooled':>8} {'LR share':>9} {'all finish':>11} {'following':>22} "
          f"{'raw rule':>22}")
    for name, end in result["all_finish"].items():
        ms = result["milestone_scores"].get(name, {})
        lr = "-" if ms.get("lr_fraction") is None else f"{ms['lr_fraction']:.0%}"
        cells = []
        for rule in (result["followed"], result["raw_rule_followed"]):
            r = rule["arms"][name]
            cells.append(f"{f3(r['f1'])}@{r['step']} {r['status'].split(' ')[0]}")
        print(f"{name:20} {f3(ms.get('raw_f1')):>10} {f3(ms.get('cooled_f1')):>8} {lr:>9} "
              f"{f3(end['f1']):>6}@{end['step']:<4} {cells[0]:>22} {cells[1]:>22}")
    for label, key, rule in (("milestone verdict", "milestone_verdict", "followed"),
                             ("raw scores alone (old rule)", "raw_rule_verdict", "raw_rule_followed")):
        r = result[rule]
        print(f"{label}: {result[key]['headline']}\n  following it keeps {r['kept_arm']} (F1 {f3(r['kept_f1'])}); "
              f"it stops an arm that ends better than that: {r['stopped_an_arm_that_ends_better']}")
    print(f"best arm when every arm finishes its own schedule: {result['best_arm_at_the_end']} "
          f"(F1 {f3(result['best_f1_all_finish'])}); following the verdict: {result['kept_minus_best'] * 100:+.1f} "
          f"points against that, the raw rule: {result['raw_rule_kept_minus_best'] * 100:+.1f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("target", choices=["demo", "seed", "smoke"])
    parser.add_argument("--work", type=Path, default=None, help="logs and the result (default: a temporary folder, "
                        "the result in bench/results/)")
    parser.add_argument("--model", type=Path, help="seed: the model folder (e.g. /tmp/smollm2-135m-instruct)")
    parser.add_argument("--data", type=Path, help="seed: a folder with train.jsonl and test.jsonl")
    parser.add_argument("--tag", default=None, help="names the result file (default: the target)")
    parser.add_argument("--name", default="pii-seed-decisions", help="seed: the experiment's name under WORK/logs")
    parser.add_argument("--limit", type=float, default=1800, help="seconds to wait for each stage")
    args = parser.parse_args()
    work, logs = work_folders(args.work, "decisions")
    experiment = (seed_from_args(parser, args, args.name) if args.target == "seed"
                  else demo_experiment(logs, tiny=args.target == "smoke"))
    result = run(experiment, logs, args.limit)
    import platform

    import peft
    import torch
    import transformers

    result["machine"] = {"python": platform.python_version(), "torch": torch.__version__,
                         "transformers": transformers.__version__, "peft": peft.__version__,
                         "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu",
                         "command": "python bench/decisions.py " + " ".join(sys.argv[1:])}
    out_dir = work if args.work else RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"decisions_{args.tag or args.target}.json"
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print_summary(result)
    print(f"wrote {path}")
    return 0 if result["followed"]["arms"] else 1


if __name__ == "__main__":
    sys.exit(main())
