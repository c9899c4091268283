"""`python -m gputwin.train ARM_DIR`: the trainer process of one arm (the launcher starts it detached);
`python -m gputwin.train --group ARM_DIR ARM_DIR...`: one process co-training arms that share a base model."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Callable

import psutil

from .loop import train

PROFILE_SETTING = "GPUTWIN_CPROFILE"  # a folder: each trainer writes its cProfile stats there (`profiled`)
# How long a thread may hold the GIL while another waits for it (Python's default: 5 ms). The trainer's main
# thread mostly waits on the GPU and releases the GIL for it; each time it wants it back while a helper thread
# (the data's tokenising at start-up, a checkpoint's write, the validation's prompts) computes, it waited up to
# the whole interval. Loading the model beside the data's tokenising took 1.7 s instead of 0.5 s on an H100
# machine (bench/RESULTS.md).
SWITCH_INTERVAL_S = 0.0005


def process_age() -> float:
    """Seconds since this process started.

    psutil's create_time adds the boot time, which Linux gives in whole seconds (/proc/stat btime), so a
    difference with time.time() is off by up to a second; the start in clock ticks since boot
    (/proc/self/stat) against CLOCK_BOOTTIME is exact to a tick (10 ms)."""
    try:
        with open("/proc/self/stat", encoding="ascii") as fh:
            ticks = int(fh.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime
        return time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):  # not Linux
        return time.time() - psutil.Process().create_time()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gputwin.train",
                                     description="Train one gputwin arm; events go to ARM_DIR/events.jsonl.")
    parser.add_argument("arm_dir", nargs="+", help="the arm folder holding profile.json (made by `gputwin run`)")
    parser.add_argument("--group", action="store_true",
                        help="co-train the arms named (one base model for all of them; gputwin.train.cotrain)")
    args = parser.parse_args(argv)
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    if len(args.arm_dir) > 1 and not args.group:
        parser.error("several arm folders need --group")
    if args.group:
        from .cotrain import train_group  # (it imports transformers, which a lone arm imports in its start-up)
    # process start to here: Python, torch, transformers and the rest imported (reported in `started`)
    imports_seconds = round(process_age(), 3)

    def run() -> int:
        if args.group:
            return train_group(args.arm_dir, imports_seconds=imports_seconds)
        return train(args.arm_dir[0], imports_seconds=imports_seconds)

    folder = os.environ.get(PROFILE_SETTING)
    return profiled(run, Path(folder)) if folder else run()


def profiled(run: Callable[[], int], folder: Path) -> int:
    """run() under cProfile, its stats to FOLDER/trainer-PID.prof (`python -m pstats` reads them): where a
    trainer's Python time goes, its start-up and first steps included, whether forked warm or started fresh."""
    import cProfile

    profiler = cProfile.Profile()
    try:
        return profiler.runcall(run)
    finally:
        folder.mkdir(parents=True, exist_ok=True)
        profiler.dump_stats(folder / f"trainer-{os.getpid()}.prof")


if __name__ == "__main__":
    sys.exit(main())
