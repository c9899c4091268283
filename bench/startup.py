"""Start-up of one arm, from `gputwin run ... --headless` to its first training step, cold and warm.

    python bench/startup.py prepare [--work DIR]             (here, needs Faker) synthetic data + a byte-level BPE
                                                             tokenizer -> DIR (default bench/out/startup)
    python3 bench/startup.py model --work DIR [--out M]      (any machine) random-init Qwen3-0.6B from its config
                                                             with that tokenizer, saved to M (default /tmp/...)
    python3 bench/startup.py run --train F --test F --model M [--device 0] [--tag h100] [--rounds N]
                             [--results DIR] [--milestone STEP --sample-size N (data smaller than the seed's)]
    python3 bench/startup.py imports [--results DIR --tag T]  (any machine) the trainer's imports alone
    python bench/startup.py smoke --work DIR                 (CPU, tests) all of it at toy sizes

`run` times, on whatever device the profile names:
  - the launcher's own work: `gputwin run PROFILE --headless` from process start to the moment it would
    start the first arm's supervisor (median of 3; the probe stops there, nothing is spawned), and which heavy
    libraries it imported on the way (there should be none);
  - per launch, cold (the tokenised-data cache emptied first) and warm (the cache from the cold launch): the
    seed's conservative profile on the given data and model as a one-arm experiment, timed from launch to the
    printed "Started" line, to the start of the trainer process, to its `started` event and to its first
    `step` event; then the arm is stopped. The `started` event's startup_seconds give the trainer's phases
    (data runs beside model, lora and engine; total is their wall time), data_cache its cache outcome and
    tokenizer_load whether the tokenizer loaded before training ("startup") or after its first step
    ("deferred": the cached data holds what training needs of it);
  - then with warm starts on (gputwin.control.warmstart): a first launch that starts cold and leaves a warm
    server starting, and, once it serves, `hot` launches whose supervisor and trainer are its forks (imports done);
    and a launch `after check`: `gputwin check PROFILE` first (no server before it), the launch once the server
    that the check left serves (check_s: the check's own seconds; server_ready_s: from the check to the server);
  - the trainer's imports one by one in fresh processes (also alone: `imports`): torch, gputwin's trainer,
    transformers, its tokenizer and modeling modules, peft, the fast engine, each as what it adds to those
    before it; then again with the heavy parts that transformers pulls in (torch._dynamo, torch.distributed,
    scipy, kernels, accelerate, ...) imported first, each on its own; and -X importtime's self time by package.
Prints tables and writes RESULTS/startup_TAG.json (default bench/results/).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
WORK = REPO / "bench" / "out" / "startup"
RESULTS = REPO / "bench" / "results"
HEAVY = ("torch", "transformers", "peft", "tokenizers", "safetensors", "numpy", "textual")
ARM = "conservative"
PHASES = ("imports", "device", "data", "transformers", "tokenizer", "data_wait", "model", "lora", "engine", "total")


# ---------------------------------------------------------------- inputs


def prepare(work: Path, train: int = 3516, test: int = 600, vocab: int = 16000) -> None:
    """The seed-sized data set and tokenizer (bench/seed_e2e.py's)."""
    from seed_e2e import prepare as seed_prepare

    seed_prepare(train=train, test=test, vocab=vocab, work=work)


def build_model(tokenizer_dir: Path, out: Path, tiny: bool) -> Path:
    """Random-init Qwen3-0.6B (tiny: 2 layers of width 64) saved with the tokenizer, as a local model folder."""
    import torch
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

    tokenizer = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)
    config = Qwen3Config.from_json_file(str(REPO / "src/gputwin/model_configs/Qwen--Qwen3-0.6B.json"))
    config.eos_token_id, config.bos_token_id = tokenizer.eos_token_id, None
    if tiny:
        config.hidden_size, config.intermediate_size, config.num_hidden_layers = 64, 128, 2
        config.num_attention_heads, config.num_key_value_heads, config.head_dim = 2, 1, 32
        config.layer_types = config.layer_types[:2]
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(config).to(torch.float32 if tiny else torch.bfloat16)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    print(f"model: {out} ({sum(p.numel() for p in model.parameters()):,} parameters)")
    return out


def write_profile(folder: Path, *, train: Path, test: Path, model: Path, device: str,
                  milestone: int | None = None, sample_size: int | None = None) -> Path:
    """profiles/conservative.toml with the data, model and device given (milestone/sample_size: toy sizes)."""
    text = (REPO / "profiles" / "conservative.toml").read_text()
    cpu = device == "cpu"
    swaps = [('base = "Qwen/Qwen3-0.6B"', f'base = "{model}"'), ('"../data/pii/train.jsonl"', f'"{train}"'),
             ('"../data/pii/test.jsonl"', f'"{test}"'),
             ("device = 0", 'device = "cpu"' if cpu else f"device = {int(device)}")]
    if cpu:
        swaps.append(('dtype = "bf16"', 'dtype = "fp32"'))
    if milestone:
        swaps.append(("step = 879 ", f"step = {milestone} "))
    if sample_size:
        swaps.append(("sample_size = 500", f"sample_size = {sample_size}"))
    for old, new in swaps:
        if old not in text:
            raise SystemExit(f"profiles/conservative.toml no longer holds {old!r}: update bench/startup.py")
        text = text.replace(old, new)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{ARM}.toml"
    path.write_text(text)
    return path


# ---------------------------------------------------------------- the launcher alone


def probe(profile: Path) -> int:
    """`gputwin run PROFILE --headless` up to the start of the first arm's supervisor: print what it imported
    and leave without spawning anything (run in a process of its own by launcher_seconds)."""
    import gputwin.control.launcher as launcher

    def stop_here(*_args: Any, **_kwargs: Any) -> None:
        print(json.dumps({"heavy": sorted(m for m in HEAVY if m in sys.modules)}), flush=True)
        os._exit(0)

    launcher.start_supervisor = stop_here  # the launcher's last own step before the arms run
    from gputwin.faces.cli import main

    main(["run", str(profile), "--headless"])
    print(json.dumps({"error": "the launcher never reached the spawn of its arms"}), flush=True)
    return 1


def launcher_seconds(profile: Path, logs: Path, env: dict[str, str], times: int = 3) -> dict[str, Any]:
    """Wall time of the probe, process start to exit, `times` over (a fresh logs folder each)."""
    import statistics

    seconds, heavy = [], None
    for i in range(times):
        folder = logs / f"probe-{i}"
        shutil.rmtree(folder, ignore_errors=True)
        began = time.perf_counter()
        done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "probe", str(profile)],
                              env={**env, "GPUTWIN_LOGS": str(folder)}, capture_output=True, text=True, timeout=300)
        seconds.append(time.perf_counter() - began)
        shutil.rmtree(folder, ignore_errors=True)
        report = json.loads(done.stdout.strip().splitlines()[-1]) if done.stdout.strip() else {}
        if done.returncode != 0 or "heavy" not in report:
            raise SystemExit(f"launcher probe failed: {report.get('error', '')}\n{done.stderr[-3000:]}")
        heavy = report["heavy"]
    return {"median_s": round(statistics.median(seconds), 3), "runs_s": [round(s, 3) for s in seconds],
            "heavy_imports": heavy}


# ---------------------------------------------------------------- one launch


def _events(log: Path) -> list[dict[str, Any]]:
    try:
        lines = log.read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    return [json.loads(line) for line in lines if line.endswith("}")]


def launch(profile: Path, logs: Path, name: str, env: dict[str, str], wait_s: float) -> dict[str, Any]:
    """`gputwin run PROFILE --headless --name NAME`: timed to the first step, then the arm is stopped."""
    env = {**env, "GPUTWIN_LOGS": str(logs)}
    cli = [sys.executable, "-m", "gputwin.faces.cli"]
    log = logs / name / ARM / "events.jsonl"
    started_line: list[float] = []
    launched_wall, launched = time.time(), time.perf_counter()
    proc = subprocess.Popen([*cli, "run", str(profile), "--headless", "--name", name], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output: list[str] = []

    def read_output() -> None:
        for line in proc.stdout:  # type: ignore[union-attr]
            if line.startswith("Started ") and not started_line:
                started_line.append(time.perf_counter() - launched)
            output.append(line)

    reader = threading.Thread(target=read_output, daemon=True)
    reader.start()
    first_step, trainer_began = None, None
    while time.perf_counter() - launched < wait_s and proc.poll() is None:
        trainer_began = trainer_began or _process_began(logs / name / ARM / "pid")
        first_step = next((e for e in _events(log) if e["kind"] == "step"), None)
        if first_step is not None:
            break
        time.sleep(0.05)
    events = _events(log)
    if first_step is not None:
        subprocess.run([*cli, "stop", ARM, "-x", name], env=env, capture_output=True, timeout=120)
    try:
        proc.wait(timeout=180)
    except subprocess.TimeoutExpired:
        proc.kill()
    _end_trainer(logs / name / ARM)
    reader.join(timeout=10)
    started = next((e for e in events if e["kind"] == "started"), None)
    if started is None or first_step is None:
        failed = next((e for e in events if e["kind"] == "failed"), None)
        raise SystemExit(f"launch {name}: no {'started' if started is None else 'step'} event "
                         f"(failed: {failed})\n{''.join(output)[-3000:]}")
    phases = started.get("startup_seconds") or {}
    began = round(trainer_began - launched_wall, 3) if trainer_began else None
    counted = phases.get("imports", 0) + phases.get("total", 0)
    return {
        "data_cache": phases.get("data_cache"),
        "started_line_s": round(started_line[0], 3) if started_line else None,
        "trainer_process_s": began,
        "started_s": round(started["t"] - launched_wall, 3),
        # the trainer's time outside imports and build_run (its log, its checkpoint look-up, the event itself)
        "other_s": round(started["t"] - launched_wall - began - counted, 3) if began is not None else None,
        "first_step_s": round(first_step["t"] - launched_wall, 3),
        "startup_seconds": phases,
        "engine": started.get("engine"),
        "device": started.get("device"),
        "samples": started.get("samples"),
    }


def hot_launches(profile: Path, logs: Path, env: dict[str, str], wait_s: float, rounds: int) -> list[dict[str, Any]]:
    """Launches with warm starts on (gputwin.control.warmstart), the data cache warm: the first starts cold and
    leaves a server starting; once it serves, each `hot` launch's supervisor and trainer are its forks."""
    cache = Path(tempfile.mkdtemp(prefix="gw-"))  # short: a socket's path holds 108 bytes
    hot_env = {**env, "GPUTWIN_WARM": "10", "XDG_CACHE_HOME": str(cache)}
    out = []
    for name in ("startup-serverless", *(f"startup-hot-{r}" for r in range(rounds))):
        shutil.rmtree(logs / name, ignore_errors=True)
    try:
        figures = launch(profile, logs, "startup-serverless", hot_env, wait_s)
        out.append({"launch": "first (server starts)", "round": 0, **figures})
        sockets = cache / "gputwin" / "warm"
        deadline = time.monotonic() + 300
        while not list(sockets.glob("*.sock")) and time.monotonic() < deadline:
            time.sleep(0.1)
        for round_ in range(rounds):
            figures = launch(profile, logs, f"startup-hot-{round_}", hot_env, wait_s)
            out.append({"launch": "hot", "round": round_, **figures})
    finally:
        _end_servers(cache)
    return out


def _end_servers(cache: Path) -> None:
    """Stop the warm servers of this cache folder and remove it."""
    for lock in (cache / "gputwin" / "warm").glob("*.lock"):
        try:
            os.kill(int(lock.read_text()), signal.SIGTERM)
        except (OSError, ValueError):
            pass
    shutil.rmtree(cache, ignore_errors=True)


def checked_launch(profile: Path, logs: Path, env: dict[str, str], wait_s: float) -> dict[str, Any]:
    """`gputwin check PROFILE`, then, once the warm server the check left serves, the launch: the first launch
    after a quiet spell, started warm because a check came before it (no earlier launch left a server)."""
    cache = Path(tempfile.mkdtemp(prefix="gw-"))  # short: a socket's path holds 108 bytes
    check_env = {**env, "GPUTWIN_WARM": "10", "XDG_CACHE_HOME": str(cache)}
    shutil.rmtree(logs / "startup-checked", ignore_errors=True)
    try:
        began = time.perf_counter()
        subprocess.run([sys.executable, "-m", "gputwin.faces.cli", "check", str(profile)], env=check_env,
                       capture_output=True, check=True, timeout=300)
        checked = time.perf_counter() - began
        sockets = cache / "gputwin" / "warm"
        while not list(sockets.glob("*.sock")) and time.perf_counter() - began < 300:
            time.sleep(0.05)
        ready = time.perf_counter() - began
        figures = launch(profile, logs, "startup-checked", check_env, wait_s)
        return {"launch": "after check", "round": 0, "check_s": round(checked, 3), "server_ready_s": round(ready, 3),
                **figures}
    finally:
        _end_servers(cache)


def _process_began(pid_file: Path) -> float | None:
    """Wall time at which the process in `pid_file` started (Linux: its start in clock ticks since boot,
    exact to a tick; the create time in the pid file rests on a boot time in whole seconds)."""
    try:
        pid = int(pid_file.read_text().split()[0])
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            ticks = int(fh.read().rsplit(")", 1)[1].split()[19])
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return None
    return time.time() - age


def _end_trainer(arm: Path) -> None:
    """The trainer is detached from the launcher: make sure it is gone before the next launch."""
    try:
        pid = int((arm / "pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


# ---------------------------------------------------------------- the trainer's imports, one by one

# In the trainer's order: each step's wall time is what it adds to the steps before it (a fresh process).
IMPORT_STEPS = (("torch", "torch"), ("gputwin trainer", "gputwin.train.loop"), ("transformers", "transformers"),
                ("tokenizer classes", "transformers.models.auto.tokenization_auto"),
                ("modeling_utils", "transformers.modeling_utils"),
                ("model class", "transformers.models.qwen3.modeling_qwen3"), ("peft", "peft"),
                ("fast engine", "gputwin.train.fast"))
# What transformers' modeling_utils and peft pull in although a LoRA run needs none of it: imported first, after
# torch and the trainer, in a process of their own, so each shows its own cost and the steps after them the rest.
IMPORT_PARTS = ("triton", "torch.distributed.tensor", "torch.distributed.fsdp", "torch._dynamo", "scipy.optimize",
                "kernels", "accelerate")
TRANSFORMERS_PARTS = ("transformers.tokenization_utils_base", "transformers.generation.utils")
IMPORTER = """
import importlib, json, sys, time
steps, out, began = json.loads(sys.argv[1]), [], time.perf_counter()
for label, module in steps:
    t = time.perf_counter()
    try:
        importlib.import_module(module)
        seconds = round(time.perf_counter() - t, 3)
    except ImportError:
        seconds = None
    out.append([label, seconds])
print(json.dumps({"steps": out, "total": round(time.perf_counter() - began, 3)}))
"""


def _import_run(steps: list[tuple[str, str]], env: dict[str, str], importtime: bool = False) -> dict[str, Any]:
    flags = ["-X", "importtime"] if importtime else []
    done = subprocess.run([sys.executable, *flags, "-c", IMPORTER, json.dumps(steps)], env=env, capture_output=True,
                          text=True, timeout=600)
    if done.returncode != 0:
        raise SystemExit(f"import timing failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if importtime:
        result["self_by_package"] = _self_by_package(done.stderr)
    return result


def _self_by_package(text: str, top: int = 12) -> dict[str, float]:
    """-X importtime's self times summed by top-level package, heaviest first (seconds)."""
    totals: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split("|")
        if len(parts) != 3 or not line.startswith("import time:"):
            continue
        try:
            self_us = int(parts[0].rsplit(":", 1)[1])
        except ValueError:
            continue
        package = parts[2].strip().split(".")[0]
        totals[package] = totals.get(package, 0) + self_us
    return {k: round(v / 1e6, 3) for k, v in sorted(totals.items(), key=lambda kv: -kv[1])[:top]}


def import_breakdown(env: dict[str, str], times: int = 2,
                     bytecode_steps: list[tuple[str, str]] | None = None) -> dict[str, Any]:
    """The trainer's imports step by step (median of `times` fresh processes), the same with IMPORT_PARTS first,
    and one run under -X importtime summed by package."""
    import statistics

    def median_of(steps: list[tuple[str, str]]) -> dict[str, Any]:
        runs = [_import_run(steps, env) for _ in range(times)]
        seconds = {}
        for i, (label, _) in enumerate(steps):
            values = [r["steps"][i][1] for r in runs if r["steps"][i][1] is not None]
            seconds[label] = round(statistics.median(values), 3) if values else None
        return {"seconds": seconds, "total": round(statistics.median(r["total"] for r in runs), 3)}

    trainer = list(IMPORT_STEPS)
    parted = (trainer[:2] + [(name, name) for name in IMPORT_PARTS] + trainer[2:3]
              + [(name, name) for name in TRANSFORMERS_PARTS] + trainer[3:])
    profiled = _import_run(trainer, env, importtime=True)
    return {"trainer_order": median_of(trainer), "parts_first": median_of(parted),
            "self_by_package": profiled["self_by_package"], "bytecode": bytecode_effect(env, bytecode_steps or trainer, times)}


def bytecode_effect(env: dict[str, str], steps: list[tuple[str, str]], times: int) -> dict[str, Any]:
    """The trainer's imports (seconds, median of fresh processes) as this install is, compiled from source (no
    bytecode to read, none written: an empty PYTHONPYCACHEPREFIX and PYTHONDONTWRITEBYTECODE, a container
    whose packages came without .pyc files), and read from the cache gputwin gives its trainers in that case
    (gputwin.control.bytecode) once one run has filled it."""
    import statistics
    import tempfile

    from gputwin.control.bytecode import ships_bytecode

    def total(run_env: dict[str, str]) -> float:
        return round(statistics.median(_import_run(steps, run_env)["total"] for _ in range(times)), 3)

    with tempfile.TemporaryDirectory() as empty, tempfile.TemporaryDirectory() as cache:
        source = dict(env, PYTHONDONTWRITEBYTECODE="1", PYTHONPYCACHEPREFIX=empty)
        cached = {k: v for k, v in env.items() if k != "PYTHONDONTWRITEBYTECODE"}
        cached["PYTHONPYCACHEPREFIX"] = cache
        _import_run(steps, cached)  # the first run fills the cache
        return {"ships_bytecode": ships_bytecode(), "as_installed": total(env), "from_source": total(source),
                "gputwin_cache": total(cached)}


def report_imports(imports: dict[str, Any]) -> None:
    print("\nthe trainer's imports, each step what it adds to those before it (s, median of fresh processes; "
          "'-': not installed):")
    for name in ("trainer_order", "parts_first"):
        block = imports[name]
        steps = "  ".join(f"{k} {'-' if v is None else f'{v:.2f}'}" for k, v in block["seconds"].items())
        print(f"  {name.replace('_', ' ')} (total {block['total']:.2f}): {steps}")
    print("  self time by package (-X importtime, trainer order): "
          + ", ".join(f"{k} {v:.2f}" for k, v in imports["self_by_package"].items()))
    code = imports.get("bytecode")
    if code:
        print(f"  bytecode: as installed {code['as_installed']:.2f} s (the packages ship .pyc: "
              f"{code['ships_bytecode']}), compiled from source {code['from_source']:.2f} s, from gputwin's "
              f"bytecode cache {code['gputwin_cache']:.2f} s")


# ---------------------------------------------------------------- run and report


def machine(device: str) -> dict[str, Any]:
    import platform
    from importlib.metadata import PackageNotFoundError, version

    info: dict[str, Any] = {"python": platform.python_version(), "cpu_count": os.cpu_count(), "device": device}
    for package in ("torch", "transformers", "tokenizers", "peft"):
        try:
            info[package] = version(package)
        except PackageNotFoundError:
            info[package] = None
    if device != "cpu":
        try:
            info["gpu"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader",
                                          f"--id={device}"], capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError) as exc:
            info["gpu"] = f"unavailable: {exc}"
    return info


def run(*, train: Path, test: Path, model: Path, device: str, tag: str, rounds: int, logs: Path, results: Path,
        wait_s: float, milestone: int | None = None, sample_size: int | None = None,
        import_times: int = 2, bytecode_steps: list[tuple[str, str]] | None = None,
        warm_process: bool = True) -> dict[str, Any]:
    profile = write_profile(logs / "profiles", train=train.resolve(), test=test.resolve(), model=model.resolve(),
                            device=device, milestone=milestone, sample_size=sample_size)
    paths = [str(REPO / "src"), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths), PYTHONUNBUFFERED="1", GPUTWIN_WARM="off")
    cache = logs / ".cache" / "tokenized"
    result: dict[str, Any] = {"tag": tag, "machine": machine(device), "profile": str(profile),
                              "launcher": launcher_seconds(profile, logs, env), "launches": []}
    for round_ in range(rounds):
        shutil.rmtree(cache, ignore_errors=True)
        for kind in ("cold", "warm"):
            shutil.rmtree(logs / f"startup-{kind}-{round_}", ignore_errors=True)
            figures = launch(profile, logs, f"startup-{kind}-{round_}", env, wait_s)
            result["launches"].append({"launch": kind, "round": round_, **figures})
    if warm_process:
        result["launches"] += hot_launches(profile, logs, env, wait_s, rounds)
        result["launches"].append(checked_launch(profile, logs, env, wait_s))
    result["imports"] = import_breakdown(env, times=import_times, bytecode_steps=bytecode_steps)
    results.mkdir(parents=True, exist_ok=True)
    path = results / f"startup_{tag}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    report(result)
    report_imports(result["imports"])
    print(f"\nwritten: {path}")
    return result


def report(result: dict[str, Any]) -> None:
    launcher = result["launcher"]
    rows = []
    for item in result["launches"]:
        phases = item["startup_seconds"]
        rows.append([f"{item['launch']} {item['round']}", item["data_cache"], phases.get("tokenizer_load"),
                     item["started_line_s"],
                     item["trainer_process_s"], *(phases.get(p) for p in PHASES), item["other_s"],
                     item["started_s"], item["first_step_s"]])
    columns = ["launch", "cache", "tok. load", "'Started'", "trainer", *PHASES, "other", "started", "1st step"]
    cells = [[("-" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v)) for v in row] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    samples = result["launches"][0]["samples"] if result["launches"] else "?"
    print(f"\nstart-up of one arm on {result['launches'][0]['device'] if result['launches'] else '?'} "
          f"({samples} samples). 'Started': the launcher printed it; trainer: its process began; started, 1st step: "
          f"its events (seconds after launch). Phases in seconds; data runs beside model, lora and engine.")
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))
    heavy = ", ".join(launcher["heavy_imports"]) or "none"
    print(f"launcher to the spawn of its arms: {launcher['median_s']:.3f} s (median of {launcher['runs_s']}); "
          f"heavy imports on the way: {heavy}")


def smoke(work: Path) -> int:
    """All of it on the CPU at toy sizes (for the tests): 64 samples, a 2-layer model, one round."""
    prepare(work, train=64, test=40, vocab=1000)
    model = build_model(work / "tokenizer", work / "model-tiny", tiny=True)
    result = run(train=work / "train.jsonl", test=work / "test.jsonl", model=model, device="cpu", tag="smoke",
                 rounds=1, logs=work / "logs", results=work / "results", wait_s=300, milestone=8, sample_size=8,
                 import_times=1, bytecode_steps=[("gputwin's launcher", "gputwin.control.launcher")])
    caches = [item["data_cache"] for item in result["launches"]]
    hot = [item for item in result["launches"] if item["launch"] == "hot"]
    return 0 if caches[:2] == ["written", "hit"] and hot and not result["launcher"]["heavy_imports"] else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=["prepare", "model", "run", "imports", "smoke", "probe"])
    parser.add_argument("profile", nargs="?", help="probe: the profile to launch")
    parser.add_argument("--work", type=Path, default=WORK,
                        help=f"prepare/model/smoke: data and tokenizer (default {WORK})")
    parser.add_argument("--out", type=Path, default=Path("/tmp/gputwin-startup-qwen3-0.6b"),
                        help="model: folder to write")
    parser.add_argument("--tiny", action="store_true", help="model: a 2-layer model (CPU plumbing checks)")
    parser.add_argument("--train", type=Path, help="run: training data (JSONL)")
    parser.add_argument("--test", type=Path, help="run: test data (JSONL)")
    parser.add_argument("--model", type=Path, help="run: model folder (weights + tokenizer)")
    parser.add_argument("--device", default="0", help="run: GPU index, or cpu (default 0)")
    parser.add_argument("--tag", default="local", help="run: names the result file startup_TAG.json")
    parser.add_argument("--rounds", type=int, default=1, help="run: cold+warm pairs (default 1)")
    parser.add_argument("--logs", type=Path, default=Path("/tmp/gputwin-startup-logs"), help="run: logs root")
    parser.add_argument("--results", type=Path, default=RESULTS, help=f"run: folder for the result (default {RESULTS})")
    parser.add_argument("--wait", type=float, default=600, help="run: seconds to wait for a first step")
    parser.add_argument("--milestone", type=int, help="run: milestone step instead of the seed's 879 (small data)")
    parser.add_argument("--sample-size", type=int, help="run: validation samples instead of the seed's 500")
    args = parser.parse_args()
    if args.stage == "probe":
        return probe(Path(args.profile))
    if args.stage == "prepare":
        prepare(args.work.resolve())
    elif args.stage == "model":
        build_model(args.work.resolve() / "tokenizer", args.out, tiny=args.tiny)
    elif args.stage == "smoke":
        return smoke(args.work.resolve())
    elif args.stage == "imports":
        paths = [str(REPO / "src"), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
        imports = import_breakdown(dict(os.environ, PYTHONPATH=os.pathsep.join(paths)))
        args.results.mkdir(parents=True, exist_ok=True)
        path = args.results / f"startup_imports_{args.tag}.json"
        record = {"tag": args.tag, "machine": machine(args.device), "imports": imports}
        path.write_text(json.dumps(record, indent=2) + "\n")
        report_imports(imports)
        print(f"\nwritten: {path}")
    else:
        if not (args.train and args.test and args.model):
            parser.error("run needs --train, --test and --model")
        run(train=args.train, test=args.test, model=args.model, device=args.device, tag=args.tag,
            rounds=args.rounds, logs=args.logs.resolve(), results=args.results, wait_s=args.wait,
            milestone=args.milestone, sample_size=args.sample_size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
