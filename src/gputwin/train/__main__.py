"""`python -m gputwin.train ARM_DIR`: the trainer process of one arm (the launcher starts it detached);
`python -m gputwin.train --group ARM_DIR ARM_DIR...`: one process co-training arms that share a base model."""

from __future__ import annotations

import argparse
import os
import sys
import time

import psutil

from .loop import train


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
    if len(args.arm_dir) > 1 and not args.group:
        parser.error("several arm folders need --group")
    if args.group:
        from .cotrain import train_group  # (it imports transformers, which a lone arm imports in its start-up)
    # process start to here: Python, torch, transformers and the rest imported (reported in `started`)
    imports_seconds = round(process_age(), 3)
    if args.group:
        return train_group(args.arm_dir, imports_seconds=imports_seconds)
    return train(args.arm_dir[0], imports_seconds=imports_seconds)


if __name__ == "__main__":
    sys.exit(main())
