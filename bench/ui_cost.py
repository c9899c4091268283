"""What the terminal UI costs, measured as a user meets it: the real `gputwin attach` in tmux (160x48).

  attach  an experiment of 2 x 500,000 step events, with the folds its writers save beside the logs and
          without them (a log from an older gputwin): (i) the watcher's first poll, in a fresh process,
          with its phases; (ii) from launching `gputwin attach NAME` in tmux to the first screen that
          shows both arms' step counts (capture-pane polled every 0.1 s)        goal <= 1 s with the folds;
          and what keeping the fold costs the writer: microseconds per EventWriter.emit, fold off and on
  cpu     two writer processes append step events at 50 steps/s each (the trainer's lines, flushed per
          line) while the UI runs attached; the UI process's CPU over the window          goal <= 5% of a core
  split   where that CPU goes: the same app in this process under Pilot, as it is and with its loss
          charts drawn once only
  train   two tiny CPU arms (tests/tiny.py) trained with nothing attached and with the UI attached,
          alternating; mean tokens/s from the step events                                 goal >= 0.99x;
          and the UI's CPU while the measured steps ran, with the ratio it implies when the arms keep
          every core busy (other work on the machine can swing a pair's ratio by 15%; this cannot)

  .venv/bin/python bench/ui_cost.py                  # everything, about 8 minutes on 2 cores
  .venv/bin/python bench/ui_cost.py --smoke          # small sizes, seconds; for tests (correctness only)
  .venv/bin/python bench/ui_cost.py --sections cpu   # one part

Prints a table and writes bench/out/ui_cost.json. Every experiment lives under a temporary GPUTWIN_LOGS;
tmux runs on a private socket; every process started here is killed before it exits.
"""

from __future__ import annotations

import argparse
import bisect
import json
import math
import os
import platform
import random
import re
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))  # run from a checkout without installing

from gputwin.core import events as ev
from gputwin.reading.eventlog import EventWriter  # noqa: E402
from gputwin.reading import foldcache
from gputwin.control import supervise
from gputwin.core.paths import ArmPaths, ExperimentPaths  # noqa: E402

OUT_DIR = REPO / "bench" / "out"
GOALS = {"train_ratio": 0.99, "ui_cpu_pct": 5.0, "attach_s": 1.0}
TERMINAL = (160, 48)
SCREEN_POLL_S = 0.1
SEED_EXPERIMENT = REPO / "profiles" / "seed.toml"


# ---------------------------------------------------------------- event lines as the trainer writes them


def step_fields(step: int, rng: random.Random, seen: list[int], steps_per_epoch: int) -> dict[str, Any]:
    """One step event's fields, as gputwin.train.loop emits them (seen = [samples, tokens] so far)."""
    tokens = 4 * 248 + rng.randint(-60, 60)
    seconds = 0.02 + rng.uniform(-0.002, 0.002)
    seen[0] += 4
    seen[1] += tokens
    return {"step": step, "epoch": round(step / steps_per_epoch, 6),
            "loss": 2.7 * math.exp(-step / 50_000) + 0.21 + abs(rng.gauss(0, 0.05)),
            "lr": 1e-4 * max(0.0, 1 - step / (2 * steps_per_epoch)), "grad_norm": abs(rng.gauss(0.9, 0.25)) + 0.2,
            "samples": 4, "tokens": tokens, "samples_seen": seen[0], "tokens_seen": seen[1],
            "step_seconds": round(seconds, 6), "tokens_per_s": round(tokens / seconds, 1)}


def step_line(t: float, fields: dict[str, Any]) -> str:
    """The line ev.dumps(ev.make("step", ...)) gives, byte for byte, without its checks (a million of them)."""
    return ('{"v":%d,"t":%r,"kind":"step",' % (ev.SCHEMA_VERSION, t)
            + json.dumps(fields, separators=(",", ":"))[1:] + "\n")


def write_pid_file(arm: ArmPaths, pid: int) -> None:
    arm.pid.write_text(f"{pid} {psutil.Process(pid).create_time():.3f}\n")


def seed_layout(root: Path, name: str) -> tuple[ExperimentPaths, list[dict[str, Any]]]:
    """An experiment folder as `gputwin run profiles/seed.toml` leaves it, before any event."""
    from gputwin.core.profiles import load_experiment

    exp = ExperimentPaths(root / name)
    exp.root.mkdir(parents=True)
    data = load_experiment(SEED_EXPERIMENT, check_files=False).to_dict()
    data["name"] = name
    exp.experiment_json.write_text(json.dumps(data, indent=2) + "\n")
    for profile in data["arms"]:
        arm = exp.arm(profile["name"])
        arm.root.mkdir()
        arm.profile_json.write_text(json.dumps(profile, indent=2) + "\n")
    return exp, data["arms"]


def write_experiment(root: Path, name: str, steps: int, *, pid: int, step_s: float = 0.02) -> ExperimentPaths:
    """The seed's two arms with `steps` step events each (checkpoint every 200), ending now.

    The arms are out of step as in the seed story (the second began 167 steps later) and their end steps
    differ (2 x steps and 1.6 x steps), so each pane's "N/TOTAL steps" names its arm."""
    exp, profiles = seed_layout(root, name)
    for number, (profile, total) in enumerate(zip(profiles, (2 * steps, int(1.6 * steps)))):
        arm = exp.arm(profile["name"])
        write_pid_file(arm, pid)
        rng, seen = random.Random(number), [0, 0]
        t = time.time() - (steps + 167 * (1 - number)) * step_s
        with open(arm.events, "w", encoding="utf-8") as fh:
            fh.write(ev.dumps(ev.make(ev.STARTED, t=t, arm=profile["name"], pid=pid, device=f"cuda:{number}",
                                      samples=4 * steps, steps_per_epoch=steps, total_steps=total,
                                      milestone_step=int(1.2 * steps))) + "\n")
            for step in range(1, steps + 1):
                t += step_s
                fh.write(step_line(t, step_fields(step, rng, seen, steps)))
                if step % 200 == 0:
                    checkpoint = ev.make(ev.CHECKPOINT, t=t, step=step, path=f"checkpoints/step-{step:06d}")
                    fh.write(ev.dumps(checkpoint) + "\n")
    return exp


def arm_totals(exp: ExperimentPaths) -> dict[str, int]:
    """Each arm's end step, from its started event (the log's first line)."""
    totals = {}
    for arm in exp.arms():
        with open(arm.events, "rb") as fh:
            totals[arm.name] = ev.parse(fh.readline())["total_steps"]
    return totals


def last_step(arm: ArmPaths) -> int:
    """The last step logged, from the whole lines among the log's last 4 KiB (a writer may be mid-line)."""
    with open(arm.events, "rb") as fh:
        start = max(0, fh.seek(0, os.SEEK_END) - 4096)
        fh.seek(start)
        pieces = fh.read().split(b"\n")
    whole = pieces[1 if start else 0:-1]  # a line cut by the seek, and what follows the last newline
    lines = [ln for ln in whole if b'"kind":"step"' in ln]
    return ev.parse(lines[-1])["step"] if lines else 0


# ---------------------------------------------------------------- the real UI in tmux


class Tmux:
    """A private tmux server (own socket, no user config): sessions at the bench's terminal size, as text."""

    def __init__(self) -> None:
        self.socket = f"gputwin-bench-{os.getpid()}"
        self.processes: list[psutil.Process] = []
        self._run("new-session", "-d", "-s", "keepalive", "-x", "80", "-y", "24", "sleep 86400")  # server up front
        self.socket_path = Path(self._run("display-message", "-p", "#{socket_path}").strip())

    def _run(self, *args: str) -> str:
        return subprocess.run(["tmux", "-L", self.socket, "-f", "/dev/null", *args], check=True, capture_output=True,
                              text=True).stdout

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> int:
        """Run argv in a new session (exec'd, so the pane's pid is the program's); returns that pid."""
        # COLUMNS/LINES inherited from the caller would override the terminal's size
        command = ("exec env -u COLUMNS -u LINES " + " ".join(shlex.quote(f"{k}={v}") for k, v in env.items())
                   + " " + shlex.join(argv))
        self._run("new-session", "-d", "-s", name, "-x", str(TERMINAL[0]), "-y", str(TERMINAL[1]), command)
        self._run("set-option", "-t", name, "remain-on-exit", "on")
        pid = int(self._run("display-message", "-p", "-t", name, "#{pane_pid}").strip())
        self.processes.append(psutil.Process(pid))
        return pid

    def screen(self, name: str) -> str:
        return self._run("capture-pane", "-p", "-t", name)

    def wait_for(self, name: str, found: Callable[[str], bool], timeout: float) -> tuple[float, str]:
        """Seconds until `found(screen)` held, from now (the caller times its own start)."""
        deadline = time.monotonic() + timeout
        while True:
            screen = self.screen(name)
            if found(screen):
                return time.monotonic(), screen
            if time.monotonic() > deadline:
                raise RuntimeError(f"screen of {name} not as expected after {timeout:.0f} s:\n{screen}")
            time.sleep(SCREEN_POLL_S)

    def stop(self, name: str) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-session", "-t", name], capture_output=True)

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True)
        kill_all(self.processes)
        self.socket_path.unlink(missing_ok=True)


def kill_all(processes: list[psutil.Process]) -> None:
    """Kill whichever of these processes (started by this bench) still run; psutil refuses a reused pid."""
    for process in processes:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass


def shown_steps(screen: str, totals: dict[str, int]) -> dict[str, int | None]:
    """The step each arm's "end" bar shows ("N/TOTAL steps"), by the arm's distinct TOTAL."""
    found = {int(t.replace(",", "")): int(d.replace(",", ""))
             for d, t in re.findall(r"([\d,]+)/([\d,]+) steps", screen)}
    return {arm: found.get(total) for arm, total in totals.items()}


def attach_argv(name: str) -> list[str]:
    script = Path(sys.executable).with_name("gputwin")
    return [str(script), "attach", name] if script.exists() else [sys.executable, "-m", "gputwin.faces.cli", "attach", name]


def cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def machine_busy(before: Any, after: Any) -> float:
    """Share of all cores busy between two psutil.cpu_times() readings, in percent."""
    total = sum(after) - sum(before)
    idle = (after.idle - before.idle) + (getattr(after, "iowait", 0.0) - getattr(before, "iowait", 0.0))
    return 100.0 * (total - idle) / total if total > 0 else 0.0


# ---------------------------------------------------------------- c. attach to 1,000,000 events


FOLDS_MADE_BY = ("EventWriter(events.jsonl, fold=True) opened and closed on each written log: the writer folds "
                 "the log once and saves events.fold beside it, as a trainer resumed on that log does")


def save_writer_folds(exp: ExperimentPaths) -> None:
    """Each arm's fold, saved by the writer's own code (FOLDS_MADE_BY)."""
    for arm in exp.arms():
        EventWriter(arm.events, fold=True).close()


def remove_folds(exp: ExperimentPaths) -> None:
    """A log from an older gputwin has no fold beside it (a reader saves one after folding it)."""
    for arm in exp.arms():
        foldcache.fold_path(arm.events).unlink(missing_ok=True)


def peak_rss_mib() -> float:
    """This process's peak resident memory. Linux carries ru_maxrss over from the parent across fork and
    exec (the bench's own peak would show), so /proc's VmHWM, which is this process's alone, comes first."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def probe_fold(exp_dir: str) -> None:
    """Child process, fresh interpreter: the UI's first poll (with its peak memory), then the first arm's
    log read whole and folded, to split parsing from folding."""
    started = time.perf_counter()
    from gputwin.core import state as st
    from gputwin.reading.tailer import Tailer
    from gputwin.faces.widgets.feed import ExperimentFeed

    exp = ExperimentPaths(Path(exp_dir))
    import_s = time.perf_counter() - started
    valid_folds = {arm.name: foldcache.load(arm.events) is not None for arm in exp.arms()}
    cpu0, t0 = time.process_time(), time.perf_counter()
    feed = ExperimentFeed(exp, time.time)
    feed.poll()
    cpu1, t1 = time.process_time(), time.perf_counter()
    feed.snapshot()
    figures = {"import_s": import_s, "valid_folds_at_start": valid_folds, "first_poll_s": t1 - t0,
               "first_poll_cpu_s": cpu1 - cpu0, "snapshot_s": time.perf_counter() - t1,
               "first_poll_peak_rss_mib": peak_rss_mib(),
               "steps": {n: a.step for n, a in feed.watcher.state.arms.items()}}
    first = exp.arms()[0]
    t0 = time.perf_counter()
    events, _ = Tailer(first.events).read_new()
    t1 = time.perf_counter()
    st.fold(first.name, events)
    figures.update(first_arm_read_parse_s=t1 - t0, first_arm_fold_s=time.perf_counter() - t1)
    print(json.dumps(figures))


def attach_runs(exp: ExperimentPaths, tmux: Tmux, env: dict[str, str], steps: int, repeats: int,
                with_folds: bool) -> dict[str, Any]:
    """The watcher's first poll in a fresh process, then the real UI's first full screen, `repeats` times
    each. Without folds, they are removed before every run: the reader saves one after a long log."""
    probes = []
    for _ in range(repeats):
        if not with_folds:
            remove_folds(exp)
        out = subprocess.run([sys.executable, __file__, "--probe-fold", str(exp.root)], env={**os.environ, **env},
                             check=True, capture_output=True, text=True).stdout
        probes.append(json.loads(out))
    totals = arm_totals(exp)
    want = {arm: steps for arm in totals}
    seconds = []
    for i in range(repeats):
        if not with_folds:
            remove_folds(exp)
        name = f"attach-{'folds' if with_folds else 'no-folds'}-{i}"
        start = time.monotonic()
        tmux.start(name, attach_argv(exp.name), env)
        seen, _ = tmux.wait_for(name, lambda s: shown_steps(s, totals) == want, timeout=300)
        seconds.append(seen - start)
        tmux.stop(name)
    return {"watcher": {"runs": probes, "median_first_poll_s": statistics.median(p["first_poll_s"] for p in probes)},
            "tmux_first_screen_s": seconds, "median_s": statistics.median(seconds)}


def bench_emit(root: Path, events: int, repeats: int) -> dict[str, Any]:
    """Microseconds per EventWriter.emit of a trainer's step event, with the fold off and on (runs
    alternating), and what saving and loading the fold of that log take."""
    rng, seen = random.Random(0), [0, 0]
    fields = [step_fields(step, rng, seen, events) for step in range(1, events + 1)]
    per_emit: dict[str, list[float]] = {"off": [], "on": []}
    for run in range(repeats):
        for mode in ("off", "on"):
            path = root / f"emit-{run}-{mode}" / "events.jsonl"
            with EventWriter(path, fold=mode == "on") as writer:
                writer.emit(ev.STARTED, arm="emit", pid=os.getpid(), device="cpu", samples=4 * events,
                            steps_per_epoch=events, total_steps=events, milestone_step=events)
                t0 = time.perf_counter()
                for step in fields:
                    writer.emit(ev.STEP, **step)
                per_emit[mode].append(1e6 * (time.perf_counter() - t0) / events)
    path = root / f"emit-{repeats - 1}-on" / "events.jsonl"
    saved = foldcache.load(path)
    assert saved is not None, f"{path}: the writer saved no fold"
    t0 = time.perf_counter()
    foldcache.save(path, saved.state, saved.position)
    t1 = time.perf_counter()
    foldcache.load(path)
    off, on = statistics.median(per_emit["off"]), statistics.median(per_emit["on"])
    return {"events": events, "runs_us": per_emit, "off_us": off, "on_us": on, "fold_us": on - off,
            "save_ms": 1e3 * (t1 - t0), "load_ms": 1e3 * (time.perf_counter() - t1),
            "fold_bytes": foldcache.fold_path(path).stat().st_size}


def bench_attach(logs: Path, tmux: Tmux, env: dict[str, str], steps: int, repeats: int,
                 emit: tuple[int, int]) -> dict[str, Any]:
    """c: attach with the writers' saved folds (the normal case) and without (a log from an older gputwin),
    then the writer's cost of keeping the fold."""
    t0 = time.perf_counter()
    exp = write_experiment(logs, "attach", steps, pid=os.getpid())
    written = time.perf_counter() - t0
    events = sum(a.events.read_bytes().count(b"\n") for a in exp.arms())
    size = sum(a.events.stat().st_size for a in exp.arms())
    t0 = time.perf_counter()
    save_writer_folds(exp)
    folds = {"made_by": FOLDS_MADE_BY, "seconds": time.perf_counter() - t0,
             "bytes": sum(foldcache.fold_path(a.events).stat().st_size for a in exp.arms())}
    with_folds = attach_runs(exp, tmux, env, steps, repeats, with_folds=True)
    without = attach_runs(exp, tmux, env, steps, repeats, with_folds=False)
    without["reader_saved_folds"] = all(foldcache.load(a.events) is not None for a in exp.arms())
    median = with_folds["median_s"]
    return {"steps_per_arm": steps, "events": events, "bytes": size, "write_s": written, "folds": folds,
            **with_folds, "without_folds": without, "goal_s": GOALS["attach_s"], "x_goal": median / GOALS["attach_s"],
            "met": median <= GOALS["attach_s"], "emit": bench_emit(logs.parent / "emit", *emit)}


# ---------------------------------------------------------------- b. the UI's CPU while arms log 50 steps/s


def run_writer(arm_dir: str, rate: float, total: int, history: int = 200) -> None:
    """Child process: a stand-in trainer. Writes its pid file, a started event and `history` steps at
    once, says "ready", then on a line "go" on stdin appends step events at `rate` a second until killed."""
    arm = ArmPaths(Path(arm_dir))
    write_pid_file(arm, os.getpid())
    rng, seen, per_epoch = random.Random(arm.name), [0, 0], total // 2
    with EventWriter(arm.events) as writer:
        writer.emit(ev.STARTED, arm=arm.name, pid=os.getpid(), device="cpu", samples=4 * per_epoch,
                    steps_per_epoch=per_epoch, total_steps=total, milestone_step=per_epoch)
        t = time.time() - history / rate
        with open(arm.events, "a", encoding="utf-8") as fh:
            fh.writelines(step_line(t + i / rate, step_fields(i, rng, seen, per_epoch)) for i in range(1, history + 1))
        print("ready", flush=True)
        sys.stdin.readline()
        start, step = time.monotonic(), history
        while True:
            step += 1
            writer.emit(ev.STEP, **step_fields(step, rng, seen, per_epoch))  # one flushed line, as the trainer
            pause = start + (step - history) / rate - time.monotonic()
            if pause > 0:
                time.sleep(pause)


def start_writers(exp: ExperimentPaths, rate: float, env: dict[str, str]) -> list[subprocess.Popen[str]]:
    """One writer per arm of the seed layout (end steps 100,000 and 80,000), each ready to "go"."""
    writers = []
    for arm, total in zip(exp.arms(), (100_000, 80_000)):
        writers.append(subprocess.Popen(
            [sys.executable, __file__, "--writer", str(arm.root), "--rate", str(rate), "--total", str(total)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env={**os.environ, **env}))
    for w in writers:
        assert w.stdout is not None
        if w.stdout.readline().strip() != "ready":
            stop(writers)
            raise RuntimeError(f"writer {w.args} did not start")
    return writers


def go(writers: list[subprocess.Popen[str]]) -> None:
    for w in writers:
        assert w.stdin is not None
        w.stdin.write("go\n")
        w.stdin.flush()


def stop(writers: list[subprocess.Popen[str]]) -> None:
    for w in writers:
        w.kill()
        w.wait()


def bench_cpu(logs: Path, tmux: Tmux, env: dict[str, str], rate: float, window: float, idle: float,
              repeats: int) -> dict[str, Any]:
    """b: the UI's CPU over `window` seconds of writes at `rate` per arm (after `idle` seconds without)."""
    runs = []
    for i in range(repeats):
        exp, _ = seed_layout(logs, f"cpu-{i}")
        writers = start_writers(exp, rate, env)
        try:
            totals = arm_totals(exp)
            ui = tmux.start(exp.name, attach_argv(exp.name), env)
            tmux.wait_for(exp.name, lambda s: None not in shown_steps(s, totals).values(), timeout=120)
            time.sleep(1.0)  # let the first screen's follow-up work finish
            idle_pct = cpu_percent_over(ui, idle)[0]
            go(writers)
            time.sleep(1.0)  # writers at their rate
            steps0 = {a.name: last_step(a) for a in exp.arms()}
            load0 = os.getloadavg()[0]
            writers0 = sum(cpu_seconds(w.pid) for w in writers)
            ui_pct, busy_pct, wall = cpu_percent_over(ui, window)
            writers_pct = 100.0 * (sum(cpu_seconds(w.pid) for w in writers) - writers0) / wall
            screen = tmux.screen(exp.name)
            steps1 = {a.name: last_step(a) for a in exp.arms()}
            shown = shown_steps(screen, totals)
            runs.append({"ui_cpu_pct": ui_pct, "ui_idle_cpu_pct": idle_pct, "machine_busy_pct": busy_pct,
                         "writers_cpu_pct": writers_pct, "load_avg_1m": [load0, os.getloadavg()[0]],
                         "steps_per_s": {a: (steps1[a] - steps0[a]) / wall for a in steps1},
                         "shown_lag_steps": {a: None if shown[a] is None else steps1[a] - shown[a] for a in steps1}})
            tmux.stop(exp.name)
        finally:
            stop(writers)
    median = statistics.median(r["ui_cpu_pct"] for r in runs)
    return {"rate_per_arm": rate, "window_s": window, "idle_window_s": idle, "runs": runs,
            "median_ui_cpu_pct": median, "goal_pct": GOALS["ui_cpu_pct"], "x_goal": median / GOALS["ui_cpu_pct"],
            "met": median <= GOALS["ui_cpu_pct"]}


def cpu_percent_over(pid: int, seconds: float) -> tuple[float, float, float]:
    """(the process's CPU % of one core, the machine's busy % of all cores, wall seconds) over `seconds`."""
    cpu0, machine0, t0 = cpu_seconds(pid), psutil.cpu_times(), time.monotonic()
    time.sleep(seconds)
    cpu1, machine1, wall = cpu_seconds(pid), psutil.cpu_times(), time.monotonic() - t0
    return 100.0 * (cpu1 - cpu0) / wall, machine_busy(machine0, machine1), wall


def bench_split(logs: Path, env: dict[str, str], rate: float, window: float) -> dict[str, Any]:
    """Where b's CPU goes: the same app in this process under Pilot (headless, no terminal output) with the
    writers at `rate`, as it is and with each loss chart drawn once and never again."""
    import asyncio

    from gputwin.faces.app import make_app
    from gputwin.faces.widgets.loss_chart import LossChart

    async def measure(exp: ExperimentPaths, writers: list[subprocess.Popen[str]]) -> dict[str, float]:
        app = make_app(exp)
        async with app.run_test(size=TERMINAL) as pilot:
            while app.updates < 1:
                await pilot.pause(0.05)
            go(writers)
            await pilot.pause(1.0)
            cpu0, t0, updates0 = time.process_time(), time.monotonic(), app.updates
            await pilot.pause(window)
            wall = time.monotonic() - t0
            return {"ui_cpu_pct": 100.0 * (time.process_time() - cpu0) / wall,
                    "updates_per_s": (app.updates - updates0) / wall}

    draw = LossChart.show
    result: dict[str, Any] = {"window_s": window}
    for variant in ("as_is", "charts_drawn_once"):
        exp, _ = seed_layout(logs, f"split-{variant}")
        writers = start_writers(exp, rate, env)
        try:
            if variant == "charts_drawn_once":
                LossChart.show = lambda chart, series: None if chart.series.steps else draw(chart, series)
            result[variant] = asyncio.run(measure(exp, writers))
        finally:
            LossChart.show = draw
            stop(writers)
    return result


# ---------------------------------------------------------------- a. training with and without the UI


def arm_throughput(events: list[ev.Event], warmup: int = 10) -> dict[str, float]:
    """Mean of the step events' tokens/s after `warmup` steps, and tokens over the wall time they span."""
    steps = [e for e in events if e.kind == ev.STEP][warmup:]
    if len(steps) < 2:
        raise ValueError(f"{len(steps)} step events after warm-up: too few to measure")
    wall = steps[-1].t - steps[0].t
    return {"steps": len(steps), "mean_tokens_per_s": statistics.fmean(e["tokens_per_s"] for e in steps),
            "wall_tokens_per_s": sum(e["tokens"] for e in steps[1:]) / wall, "t0": steps[0].t, "t1": steps[-1].t}


def cpu_share(samples: list[tuple[float, float]], t0: float, t1: float) -> float:
    """CPU % of one core between unix times t0 and t1, from (time, CPU seconds) samples in time order,
    interpolated linearly between the samples either side."""
    times = [t for t, _ in samples]

    def cpu_at(t: float) -> float:
        i = min(max(bisect.bisect_left(times, t), 1), len(samples) - 1)
        (ta, ca), (tb, cb) = samples[i - 1], samples[i]
        return ca + (cb - ca) * (t - ta) / (tb - ta) if tb > ta else cb

    return 100.0 * (cpu_at(t1) - cpu_at(t0)) / (t1 - t0)


def bench_train(logs: Path, tmux: Tmux, env: dict[str, str], steps: int, pairs: int) -> dict[str, Any]:
    """a: `pairs` x (detached, attached) runs of two tiny arms, the order alternating so drift cancels."""
    sys.path.insert(0, str(REPO / "tests"))
    import tiny
    from gputwin.control import launcher
    from gputwin.core.profiles import Experiment, Rules

    world = logs.parent / "tiny"
    train, test = tiny.write_data(world / "data", train=64, test=8)
    model = tiny.tiny_bert(world / "bert", tiny.make_samples(64))
    per_epoch = 16  # 64 samples in batches of 4
    arms = tuple(tiny.profile_for(model, train, test, task="tag", name=n, learning_rate=lr, epochs=steps / per_epoch,
                                  milestone_step=steps, checkpoint_every=10 * steps)
                 for n, lr in (("tiny-a", 5e-3), ("tiny-b", 1e-2)))
    order = [m for i in range(pairs) for m in (("detached", "attached") if i % 2 == 0 else ("attached", "detached"))]
    runs = []
    for i, mode in enumerate(order):
        name = f"train-{i}-{mode}"
        exp = launcher.start_experiment(Experiment(name, arms, Rules(baseline=arms[0].name)), root=logs)
        ui_pct, ui_cpu = None, []  # ui_cpu: (unix time, the UI's CPU seconds) every 0.2 s
        try:
            if mode == "attached":  # as `gputwin run` does: the UI opens as soon as the arms are spawned
                ui, t0 = tmux.start(name, attach_argv(name), env), time.monotonic()
                wait_for_exits(exp, timeout=600, watch=lambda: ui_cpu.append((time.time(), cpu_seconds(ui))))
                ui_pct = 100.0 * cpu_seconds(ui) / (time.monotonic() - t0)
                tmux.stop(name)
            else:
                wait_for_exits(exp, timeout=600)
        finally:
            kill_trainers(exp)
        per_arm = {a.name: arm_throughput(ev.read_events(a.events).events) for a in exp.arms()}
        measured = (min(a["t0"] for a in per_arm.values()), max(a["t1"] for a in per_arm.values()))
        runs.append({"mode": mode, "arms": per_arm, "ui_cpu_pct": ui_pct,
                     # the UI's CPU while the measured steps ran: its start (imports, first screen) falls in the
                     # trainers' own start and warm-up, which no tokens/s figure counts
                     "ui_cpu_pct_steps": cpu_share(ui_cpu, *measured) if ui_cpu else None,
                     "mean_tokens_per_s": statistics.fmean(a["mean_tokens_per_s"] for a in per_arm.values()),
                     "wall_tokens_per_s": statistics.fmean(a["wall_tokens_per_s"] for a in per_arm.values())})
    return summarise_train(runs, steps, training_cores=min(os.cpu_count() or 1, len(arms)))


def summarise_train(runs: list[dict[str, Any]], steps: int, training_cores: int = 2) -> dict[str, Any]:
    """Ratio of medians, attached over detached; each back-to-back pair's ratio shows the spread.

    When noise from other work hides the effect, CPU accounting still bounds it: with every one of the
    `training_cores` busy training, each CPU second the UI takes comes out of training, so the ratio is
    about 1 - (the UI's share of a core while the steps ran) / training_cores."""
    by_mode = {m: [r["mean_tokens_per_s"] for r in runs if r["mode"] == m] for m in ("detached", "attached")}
    pairs = [(a, b) for a, b in zip(runs[::2], runs[1::2])]
    pair_ratios = [(a if a["mode"] == "attached" else b)["mean_tokens_per_s"]
                   / (b if a["mode"] == "attached" else a)["mean_tokens_per_s"] for a, b in pairs]
    ratio = statistics.median(by_mode["attached"]) / statistics.median(by_mode["detached"])
    wall = {m: statistics.median(r["wall_tokens_per_s"] for r in runs if r["mode"] == m) for m in by_mode}
    goal = GOALS["train_ratio"]
    return {"steps_per_arm": steps, "runs": runs, "tokens_per_s": by_mode,
            "median_detached": statistics.median(by_mode["detached"]),
            "median_attached": statistics.median(by_mode["attached"]),
            "ratio": ratio, "wall_ratio": wall["attached"] / wall["detached"], "pair_ratios": pair_ratios, "goal_ratio": goal, "met": ratio >= goal,
            # the pairs straddling the goal: the machine's noise is larger than the effect
            "conclusive": all(r >= goal for r in pair_ratios) or all(r < goal for r in pair_ratios),
            **ui_accounting(runs, training_cores)}


def ui_accounting(runs: list[dict[str, Any]], training_cores: int) -> dict[str, Any]:
    """The UI's median CPU share while the measured steps ran, and the ratio it implies (see summarise_train)."""
    shares = [r["ui_cpu_pct_steps"] for r in runs if r.get("ui_cpu_pct_steps") is not None]
    if not shares:
        return {}
    share = statistics.median(shares)
    return {"ui_cpu_pct_steps": shares, "median_ui_cpu_pct_steps": share, "training_cores": training_cores,
            "accounting_ratio": 1.0 - share / 100.0 / training_cores}


def wait_for_exits(exp: ExperimentPaths, timeout: float, watch: Callable[[], None] = lambda: None) -> None:
    """Until every arm has exited (an error if one failed); `watch` runs every 0.2 s meanwhile."""
    deadline = time.monotonic() + timeout
    while any(supervise.read_exit(a) is None for a in exp.arms()):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{exp.name}: arms still running after {timeout:.0f} s")
        watch()
        time.sleep(0.2)
    failed = {a.name: supervise.read_exit(a) for a in exp.arms() if supervise.read_exit(a) != 0}
    if failed:
        raise RuntimeError(f"{exp.name}: trainers failed {failed}; see their stderr.log")


def kill_trainers(exp: ExperimentPaths) -> None:
    for arm in exp.arms():
        recorded = supervise.read_pid(arm)
        if recorded is not None and supervise.process_alive(*recorded):
            kill_all([psutil.Process(recorded[0])])


# ---------------------------------------------------------------- the whole bench


def machine() -> dict[str, Any]:
    import textual

    return {"cpus": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "gpu": None, "load_avg": os.getloadavg(), "python": platform.python_version(),
            "textual": textual.__version__, "platform": platform.platform(),
            "terminal": f"tmux {TERMINAL[0]}x{TERMINAL[1]}"}


SIZES = {  # full bench, --smoke
    "attach_steps": (500_000, 1_000), "attach_repeats": (2, 1), "emit_events": (20_000, 200),
    "emit_repeats": (5, 1),
    "cpu_window": (30.0, 2.0), "cpu_idle": (5.0, 1.0), "cpu_repeats": (3, 1), "split_window": (10.0, 1.0),
    "train_steps": (1_000, 40), "train_pairs": (4, 1),
}


def run(sections: list[str], smoke: bool) -> dict[str, Any]:
    size = {k: v[1 if smoke else 0] for k, v in SIZES.items()}
    result: dict[str, Any] = {"command": shlex.join([Path(sys.executable).name, *sys.argv]), "smoke": smoke,
                              "goals": GOALS, "machine": machine()}
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="gputwin-ui-cost-") as tmp:
        logs = Path(tmp) / "logs"
        env = {"GPUTWIN_LOGS": str(logs)}
        tmux = Tmux()
        try:
            if "attach" in sections:
                result["attach"] = bench_attach(logs, tmux, env, size["attach_steps"], size["attach_repeats"],
                                                (size["emit_events"], size["emit_repeats"]))
            if "cpu" in sections:
                result["cpu"] = bench_cpu(logs, tmux, env, 50.0, size["cpu_window"], size["cpu_idle"],
                                          size["cpu_repeats"])
            if "split" in sections:
                result["split"] = bench_split(logs, env, 50.0, size["split_window"])
            if "train" in sections:
                result["train"] = bench_train(logs, tmux, env, size["train_steps"], size["train_pairs"])
        finally:
            tmux.close()
            for exp in logs.glob("train-*"):  # the only real trainers (the attach log names this process)
                kill_trainers(ExperimentPaths(exp))
    result["total_s"] = time.monotonic() - started
    return result


def table_rows(result: dict[str, Any]) -> Iterator[tuple[str, str, str, str]]:
    if "train" in result:
        t = result["train"]
        yield ("a. tokens/s attached vs detached", f">= {GOALS['train_ratio']}x",
               f"{t['ratio']:.3f}x ({t['median_attached']:,.0f} vs {t['median_detached']:,.0f}; by wall time "
               f"{t['wall_ratio']:.3f}x; pairs "
               + ", ".join(f"{r:.3f}" for r in t["pair_ratios"]) + ")",
               ("yes" if t["met"] else "NO") if t["conclusive"] else "unclear (noise > effect)")
        if "accounting_ratio" in t:
            yield ("a. same, by CPU accounting", f">= {GOALS['train_ratio']}x",
                   f"~{t['accounting_ratio']:.3f}x (the UI took {t['median_ui_cpu_pct_steps']:.1f}% of a core while "
                   f"the steps ran, runs " + ", ".join(f"{x:.1f}" for x in t["ui_cpu_pct_steps"])
                   + f"; {t['training_cores']} cores training)", "yes" if t["accounting_ratio"] >= GOALS["train_ratio"]
                   else "NO")
    if "cpu" in result:
        c = result["cpu"]
        yield ("b. UI CPU, 2 arms x 50 steps/s", f"<= {GOALS['ui_cpu_pct']:.0f}% of a core",
               f"{c['median_ui_cpu_pct']:.1f}% (runs " + ", ".join(f"{r['ui_cpu_pct']:.1f}" for r in c["runs"])
               + f"; idle {statistics.median(r['ui_idle_cpu_pct'] for r in c['runs']):.1f}%)",
               "yes" if c["met"] else "NO")
    if "split" in result:
        sp = result["split"]
        yield ("b. same, in-process (Pilot)", "-", f"{sp['as_is']['ui_cpu_pct']:.1f}% as is, "
               f"{sp['charts_drawn_once']['ui_cpu_pct']:.1f}% with the loss charts drawn once", "-")
    if "attach" in result:
        a = result["attach"]
        n = a["without_folds"]
        yield ("c. attach, first screen (tmux), saved folds", f"<= {GOALS['attach_s']:.0f} s",
               f"{a['median_s']:.2f} s for {a['events']:,} events (runs "
               + ", ".join(f"{s:.2f}" for s in a["tmux_first_screen_s"]) + ")", "yes" if a["met"] else "NO")
        yield ("c. same, no saved folds (older log)", "-", f"{n['median_s']:.2f} s (runs "
               + ", ".join(f"{s:.2f}" for s in n["tmux_first_screen_s"]) + ")", "-")
        yield ("c. watcher's first poll", "-", f"{a['watcher']['median_first_poll_s']:.3f} s with saved folds, "
               f"{n['watcher']['median_first_poll_s']:.2f} s without", "-")
        e = a["emit"]
        yield ("c. writer: one step event's emit", "-", f"{e['off_us']:.1f} us, {e['on_us']:.1f} us with the fold "
               f"(+{e['fold_us']:.1f} us); a save {e['save_ms']:.1f} ms", "-")


def print_table(result: dict[str, Any]) -> None:
    rows = [("figure", "goal", "measured", "met")] + list(table_rows(result))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for n, row in enumerate(rows):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))
        if n == 0:
            print("  ".join("-" * w for w in widths))
    print(f"machine: {result['machine']['cpus']} cores, {result['machine']['memory_gib']} GiB, no GPU; "
          f"load average at start {result['machine']['load_avg'][0]:.2f}; total {result['total_s']:.0f} s")
    if "attach" in result:
        print(f"saved folds: {result['attach']['folds']['made_by']}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="small sizes for tests (figures mean nothing)")
    parser.add_argument("--sections", default=None, help="comma-separated: attach,cpu,split,train (default all; "
                        "--smoke: attach,cpu,split)")
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="folder for ui_cost.json")
    parser.add_argument("--probe-fold", help=argparse.SUPPRESS)
    parser.add_argument("--writer", help=argparse.SUPPRESS)
    parser.add_argument("--rate", type=float, default=50.0, help=argparse.SUPPRESS)
    parser.add_argument("--total", type=int, default=100_000, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe_fold:
        probe_fold(args.probe_fold)
        return 0
    if args.writer:
        run_writer(args.writer, args.rate, args.total)
        return 0
    sections = (args.sections or ("attach,cpu,split" if args.smoke else "attach,cpu,split,train")).split(",")
    unknown = set(sections) - {"attach", "cpu", "split", "train"}
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}: use attach, cpu, split, train")
    result = run(sections, args.smoke)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "ui_cost.json"
    path.write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
    print_table(result)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
