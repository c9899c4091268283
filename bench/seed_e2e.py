"""The seed's workload end to end: both seed profiles from launch to verdict on one GPU.

Two stages, because the GPU machine has no network and no Faker:
  python bench/seed_e2e.py prepare            (here) synthetic data + a byte-level BPE tokenizer -> bench/out/seed-e2e/
  python3 bench/seed_e2e.py run               (GPU)  random-init Qwen3-0.6B from its config, the seed profiles
                                                     with both arms on GPU 0, `gputwin run --headless`, timed
The model has the real architecture (same FLOPs) with random weights: F1 is near zero and means nothing; the
figure is the time from launch to verdict. Writes bench/out/seed-e2e/result-TAG.json and prints a table.
  python3 bench/seed_e2e.py run --only conservative --tag solo   one arm alone, to its validation
  python3 bench/seed_e2e.py run --cotrain on --tag cotrain       both arms co-trained in one process
  python3 bench/seed_e2e.py run --warm --tag hot                  a warm server first: trainers start as its forks
Without --warm, warm starts are off (GPUTWIN_WARM=off): every trainer starts as a fresh Python.
  python bench/seed_e2e.py smoke --work DIR          (CPU, tests) the same path at toy sizes, to a verdict
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
WORK = REPO / "bench" / "out" / "seed-e2e"


def prepare(train: int = 3516, test: int = 600, vocab: int = 16000, work: Path | None = None) -> None:
    """Synthetic data and a byte-level BPE tokenizer in `work` (default WORK); bench/startup.py uses it too."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from gputwin.core.data import ensure_synth, load_dataset

    work = work or WORK
    work.mkdir(parents=True, exist_ok=True)
    ensure_synth(work / "train.jsonl", work / "test.jsonl", train=train, test=test, seed=0, locales=["en_US", "zh_CN"])
    texts = [s.text for s in load_dataset(work / "train.jsonl").samples]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=special, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts + ['[{"type":"EMAIL","value":"x"}]'] * 50, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.save_pretrained(work / "tokenizer")
    print(f"prepared {work}: {len(texts)} train texts, tokenizer of {len(fast)} tokens")


class _Pid:
    """A trainer that is not this process's child, with the bits of Popen that run() uses."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def poll(self) -> int | None:
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return 0
        return None

    def terminate(self) -> None:
        try:
            os.kill(self.pid, 15)
        except ProcessLookupError:
            pass

    def wait(self, timeout: float) -> None:
        deadline = time.time() + timeout
        while self.poll() is None:
            if time.time() > deadline:
                raise subprocess.TimeoutExpired("trainer", timeout)
            time.sleep(0.1)

    def kill(self) -> None:
        try:
            os.kill(self.pid, 9)
        except ProcessLookupError:
            pass


def decode_figures(validation: dict[str, Any] | None) -> dict[str, Any]:
    """From a validation event's file: the decode's seconds, and the tokens a row it decoded of its room (a model
    that never ends its answer decodes the whole room, as a random-init one does)."""
    try:
        result = json.loads(Path(validation["path"]).read_text(encoding="utf-8")) if validation else {}
    except (OSError, KeyError, ValueError):
        result = {}
    rows = result.get("n") or 0
    return {"predict_seconds": result.get("predict_seconds"), "decode_room_tokens": result.get("max_new_tokens"),
            "decoded_tokens_per_row": round(result["generated_tokens"] / rows, 1)
            if rows and result.get("generated_tokens") is not None else None,
            "validation_phases": result.get("phases"), "validation_batches": result.get("batches"),
            **({"decoder_missed": result["decoder_missed"]} if "decoder_missed" in result else {})}


def probe_figures(probe: dict[str, Any] | None) -> dict[str, Any] | None:
    """A cooldown probe's event: its steps, their seconds, its validation's seconds and phases."""
    if not probe:
        return None
    return {"steps": probe.get("steps"), "train_seconds": probe.get("train_seconds"),
            "validation_seconds": probe.get("validate_seconds"), "seconds": probe.get("seconds"),
            "graphs": probe.get("graphs"),
            "validation_phases": decode_figures(probe)["validation_phases"]}


def where_time_went(events: list[dict[str, Any]], steps: list[dict[str, Any]], launched: float) -> dict[str, Any]:
    """An arm's events other than steps, in seconds after launch (with each one's own seconds where it has them),
    its checkpoints' seconds, and its slow steps: over 3x the median step (captures, checkpoints, eager steps)."""
    timeline = [{"t": round(e["t"] - launched, 2), "kind": e["kind"], "step": e.get("step"),
                 **({"seconds": e["seconds"]} if e.get("seconds") is not None else {})}
                for e in events if e["kind"] != "step"]
    paces = sorted(e["step_seconds"] for e in steps if e.get("step_seconds") is not None)
    median = paces[len(paces) // 2] if paces else 0.0
    slow = sorted(((e["step_seconds"], e["step"]) for e in steps if (e.get("step_seconds") or 0) > 3 * median),
                  reverse=True)
    checkpoints = [e["seconds"] for e in events if e["kind"] == "checkpoint" and e.get("seconds") is not None]
    return {"timeline": timeline, "checkpoint_seconds": {"count": len(checkpoints), "total": round(sum(checkpoints), 3),
                                                        "each": checkpoints},
            "step_seconds_median": median, "slow_steps": [{"step": s, "seconds": round(x, 4)} for x, s in slow[:15]],
            "slow_steps_extra_seconds": round(sum(x - median for x, _ in slow), 3)}


def serve_warm(env: dict[str, str]) -> None:
    """A warm server (gputwin.control.warmstart) for launches with this environment, serving before the clock starts."""
    from gputwin.control import warmstart
    from gputwin.control.bytecode import child_env

    launch_env = child_env(env)
    warmstart.keep_warm(launch_env)
    socket_path = warmstart.socket_path(launch_env)
    deadline = time.time() + 300
    while socket_path is not None and not socket_path.exists() and time.time() < deadline:
        time.sleep(0.1)
    if socket_path is None or not socket_path.exists():
        raise SystemExit(f"no warm server came up; see {warmstart.folder(launch_env)}")


def random_model(model_dir: Path, *, tiny: bool, work: Path | None = None) -> None:
    """Qwen3-0.6B from its config with random weights (tiny: 2 narrow layers, on the CPU), and the tokenizer
    that prepare() trained, saved as a model folder."""
    if (model_dir / "model.safetensors").is_file() and (model_dir / "tokenizer.json").is_file():
        return  # built by an earlier run on this machine: the same weights (seed 0), not built again
    import torch
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

    tokenizer = PreTrainedTokenizerFast.from_pretrained((work or WORK) / "tokenizer")
    config = Qwen3Config.from_json_file(str(REPO / "src/gputwin/model_configs/Qwen--Qwen3-0.6B.json"))
    config.eos_token_id, config.bos_token_id = tokenizer.eos_token_id, None
    if tiny:  # a check of the plumbing on a machine without a GPU
        config.hidden_size, config.intermediate_size, config.num_hidden_layers = 64, 128, 2
        config.num_attention_heads, config.num_key_value_heads, config.head_dim = 2, 1, 32
        config.layer_types = config.layer_types[:2]
    torch.manual_seed(0)
    with torch.device("cpu" if tiny else "cuda"):
        model = Qwen3ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    del model
    torch.cuda.empty_cache()


def run(wait_limit: float, tiny: bool = False, tag: str = "both", only: str | None = None,
        profile_to: str | None = None, milestone: int | None = None, sample_size: int | None = None,
        cotrain: str | None = None, warm: bool = False, compile: str | None = None, src: Path | None = None) -> dict:
    """Launch the seed experiment (or one arm of it, `only`) and time it to the verdict (to its validation).

    milestone and sample_size replace the seed's 879 and 500 (the smoke run's small sizes); cotrain sets the
    experiment's [placement] cotrain (on: both arms in one process, gputwin.train.cotrain); src: the gputwin
    sources the experiment runs (default: this checkout's; another commit's, to compare two in one session)."""
    from gputwin.core.profiles import load_experiment

    t0 = time.time()
    model_dir = WORK / "model-tiny" if tiny else Path("/tmp/qwen3-0.6b-random")
    random_model(model_dir, tiny=tiny)
    built = time.time() - t0

    # The seed experiment as it is, but both arms on one GPU and the model from the folder.
    exp = load_experiment(REPO / "profiles" / "seed.toml", check_files=False)
    folder = WORK / "profiles"
    folder.mkdir(exist_ok=True)
    for arm in exp.arms:
        text = Path(arm.source).read_text()
        text = text.replace('base = "Qwen/Qwen3-0.6B"', f'base = "{model_dir}"').replace("device = 1", "device = 0")
        text = text.replace('"../data/pii/', f'"{WORK}/')
        if tiny:
            text = text.replace("device = 0", 'device = "cpu"').replace('dtype = "bf16"', 'dtype = "fp32"')
        if milestone:
            text = text.replace("step = 879 ", f"step = {milestone} ")
        if sample_size:
            text = text.replace("sample_size = 500", f"sample_size = {sample_size}")
        if compile:
            text = text.replace("[train]\n", f'[train]\ncompile = "{compile}"\n')
        (folder / Path(arm.source).name).write_text(text)
    placement = f'\n[placement]\ncotrain = "{cotrain}"\n' if cotrain else ""
    (folder / "seed.toml").write_text(Path(exp.source).read_text() + placement)
    logs = WORK / f"logs-{tag}" if tiny else Path(f"/tmp/gputwin-logs-{tag}")
    arms = [only] if only else ["conservative", "aggressive"]
    path = os.pathsep.join(p for p in (str(src or REPO / "src"), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, GPUTWIN_LOGS=str(logs), PYTHONPATH=path, PYTHONUNBUFFERED="1",
               GPUTWIN_WARM="20" if warm else "off")
    if profile_to and not (only and not warm):  # the trainers profile themselves, forked or not: a folder
        env["GPUTWIN_CPROFILE"] = profile_to
    if warm:
        serve_warm(env)
    out = open(WORK / f"headless-{tag}.log", "w")
    if only and warm:  # through the supervisor, which a warm server forks
        from gputwin.control.launcher import _write_arm_files, spawn_arm
        from gputwin.core.paths import ArmPaths

        profile = next(a for a in load_experiment(folder / "seed.toml").arms if a.name == only)
        arm_paths = ArmPaths(logs / "pii-seed" / only)
        _write_arm_files(arm_paths, profile)
        os.environ.update(env)  # spawn_arm takes the arm's environment from this process's
        launched = time.time()
        monitor: Any = _Pid(spawn_arm(arm_paths, profile, threads=None))
    elif only:  # one arm alone on the GPU (what an arm takes with a GPU of its own): its trainer, started directly
        from gputwin.control.launcher import _write_arm_files
        from gputwin.core.paths import ArmPaths

        profile = next(a for a in load_experiment(folder / "seed.toml").arms if a.name == only)
        _write_arm_files(ArmPaths(logs / "pii-seed" / only), profile)
        launched = time.time()
        profiler = ["-m", "cProfile", "-o", profile_to] if profile_to else []  # Python time, start-up included
        monitor = subprocess.Popen([sys.executable, *profiler, "-m", "gputwin.train", str(logs / "pii-seed" / only)],
                                   env=env, stdout=out, stderr=subprocess.STDOUT)
    else:
        launched = time.time()
        monitor = subprocess.Popen([sys.executable, "-m", "gputwin.faces.cli", "run", str(folder / "seed.toml"),
                                    "--headless"], env=env, stdout=out, stderr=subprocess.STDOUT)
    verdict = logs / "pii-seed" / "verdict.json"

    def done() -> bool:
        if not only:
            return verdict.exists()
        log = logs / "pii-seed" / only / "events.jsonl"
        return log.exists() and '"kind":"validation"' in log.read_text()

    def stop_arms() -> None:
        """The arms are detached: stopped here, or they would train on (to step 1758) beside the next run."""
        for arm in arms:
            if only:
                monitor.terminate()  # a trainer stops at the end of its step on SIGTERM
            else:
                subprocess.run([sys.executable, "-m", "gputwin.faces.cli", "stop", arm, "-x", "pii-seed"], env=env,
                               capture_output=True)
        try:
            monitor.wait(timeout=60)
        except subprocess.TimeoutExpired:
            monitor.kill()

    def cut_short(*_: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second signal (`timeout` and its caller) must not cut
        sys.exit(143)  # the stopping below

    # a bench cut short (`timeout`, Ctrl-C) stops its arms too
    previous = signal.signal(signal.SIGTERM, cut_short)
    try:
        while not done() and time.time() - launched < wait_limit and monitor.poll() is None:
            time.sleep(0.2)
        to_verdict = time.time() - launched if done() else None
    finally:
        stop_arms()
        signal.signal(signal.SIGTERM, previous)

    result = {"model_build_seconds": round(built, 1), "arms_run": arms, "cotrain": cotrain or "off", "warm": warm,
              ("launch_to_validation_seconds" if only else "launch_to_verdict_seconds"): to_verdict, "arms": {}}
    for arm in arms:
        events = [json.loads(line) for line in (logs / "pii-seed" / arm / "events.jsonl").read_text().splitlines()
                  if line.strip()]
        started = next(e for e in events if e["kind"] == "started")
        steps = [e for e in events if e["kind"] == "step"]
        milestone_step = started["milestone_step"]
        reached = next((e for e in steps if e["step"] == milestone_step), None)
        validation = next((e for e in events if e["kind"] == "validation"), None)
        probe = next((e for e in events if e["kind"] == "probe"), None)
        result["arms"][arm] = {
            "engine": started.get("engine"),
            "shares_process_with": started.get("shares_process_with", []),
            "f1": validation.get("f1") if validation else None,
            "started_after_launch_s": round(started["t"] - launched, 1),
            "first_step_after_launch_s": round(steps[0]["t"] - launched, 1) if steps else None,
            "milestone_after_launch_s": round(reached["t"] - launched, 1) if reached else None,
            "train_steps_per_s": round((len(steps) - 1) / (steps[-1]["t"] - steps[0]["t"]), 2) if len(steps) > 1 else None,
            "validation_seconds": validation.get("seconds") if validation else None,
            **decode_figures(validation),
            "validated_after_launch_s": round(validation["t"] - launched, 1) if validation else None,
            "probe": probe_figures(probe),
            "startup_seconds": started.get("startup_seconds"),
            **where_time_went(events, steps, launched),
        }
    WORK.joinpath(f"result-{tag}.json").write_text(json.dumps(result, indent=2))
    print(f"{'arm':14} {'started':>8} {'1st step':>9} {'milestone':>10} {'steps/s':>8} {'val s':>7} {'validated':>10} "
          f"{'decoded/room':>13}")
    for arm, r in result["arms"].items():
        decoded = f"{r['decoded_tokens_per_row']}/{r['decode_room_tokens']}"
        print(f"{arm:14} {r['started_after_launch_s']:>8} {r['first_step_after_launch_s']!s:>9} "
              f"{r['milestone_after_launch_s']!s:>10} {r['train_steps_per_s']!s:>8} {r['validation_seconds']!s:>7} "
              f"{r['validated_after_launch_s']!s:>10} {decoded:>13}")
    for arm, r in result["arms"].items():
        print(f"{arm} start-up (s): {r['startup_seconds']}")
        print(f"{arm} validation phases (s): {r['validation_phases']}")
        if r["probe"]:
            print(f"{arm} cooldown probe: {r['probe']}")
        print(f"{arm} checkpoints (s): {r['checkpoint_seconds']}; slow steps: {r['slow_steps_extra_seconds']} s over the "
              f"median {r['step_seconds_median']}: {r['slow_steps'][:8]}")
        print(f"{arm} timeline: {[(e['t'], e['kind'], e['step'], e.get('seconds')) for e in r['timeline']]}")
    print(f"launch to {'validation' if only else 'verdict'}: {to_verdict if to_verdict is None else round(to_verdict, 1)} s "
          f"(model built beforehand in {built:.1f} s)")
    return result


def smoke(cotrain: str | None = None, warm: bool = False) -> int:
    """The whole path on the CPU at toy sizes, for the tests: prepare, launch both arms of the seed
    experiment with a 2-layer model, milestone at step 8 on 16 samples, wait for the verdict."""
    prepare(train=64, test=40, vocab=1000)
    tag = "-".join(["smoke", *([cotrain] if cotrain else []), *(["warm"] if warm else [])])
    result = run(240, tiny=True, tag=tag, milestone=8, sample_size=16, cotrain=cotrain, warm=warm)
    validated = all(r["validated_after_launch_s"] is not None for r in result["arms"].values())
    return 0 if result["launch_to_verdict_seconds"] is not None and validated else 1


def main() -> int:
    global WORK
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=["prepare", "run", "smoke"])
    parser.add_argument("--work", type=Path, default=WORK, help=f"data, tokenizer and results (default {WORK})")
    parser.add_argument("--wait", type=float, default=240, help="seconds to wait for the verdict")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model on the CPU: checks the plumbing only")
    parser.add_argument("--tag", default="both", help="names the logs folder and result-TAG.json (several runs in a row)")
    parser.add_argument("--only", choices=["conservative", "aggressive"],
                        help="run this arm alone and time it to its validation (an arm with a GPU of its own)")
    parser.add_argument("--cprofile", metavar="PATH", help="run the trainers under cProfile: with --only and no --warm, "
                        "its stats to the file PATH; otherwise each trainer's to PATH/trainer-PID.prof")
    parser.add_argument("--warm", action="store_true",
                        help="start a warm server first (gputwin.control.warmstart): the trainers start as its forks")
    parser.add_argument("--compile", choices=["on", "off", "auto"], help="the arms' train.compile")
    parser.add_argument("--src", type=Path, help="the gputwin sources the experiment runs (default: this checkout's src; "
                        "`git archive REV src | tar -x -C DIR` gives another commit's, DIR/src)")
    parser.add_argument("--cotrain", choices=["on", "off", "auto"],
                        help="the experiment's [placement] cotrain (on: both arms co-trained in one process)")
    args = parser.parse_args()
    WORK = args.work.resolve()
    if args.stage == "prepare":
        prepare()
    elif args.stage == "smoke":
        return smoke(args.cotrain, args.warm)
    else:
        run(args.wait, args.tiny, args.tag, args.only, args.cprofile, cotrain=args.cotrain, warm=args.warm,
            compile=args.compile, src=args.src.resolve() if args.src else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
