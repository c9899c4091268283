"""The `gputwin` command. Argument parsing only: each command lives in its own module and is
imported when used, so `gputwin status` never pays for torch and `gputwin --help` is instant."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Callable, Sequence

from ..core.errors import UserError

# command -> "module:function"; each function takes the parsed args and returns an exit code.
HANDLERS = {
    "run": "gputwin.faces.commands:cmd_run",
    "attach": "gputwin.faces.commands:cmd_attach",
    "demo": "gputwin.faces.commands:cmd_demo",
    "serve": "gputwin.faces.serve:cmd_serve",
    "status": "gputwin.faces.status:cmd_status",
    "stop": "gputwin.faces.commands:cmd_stop",
    "extend": "gputwin.faces.commands:cmd_extend",
    "validate-now": "gputwin.faces.commands:cmd_validate_now",
    "resume": "gputwin.faces.commands:cmd_resume",
    "validate": "gputwin.validate.run:cmd_validate",
    "report": "gputwin.faces.report:cmd_report",
    "export": "gputwin.faces.export_tb:cmd_export",
    "check": "gputwin.faces.check:cmd_check",
    "data": "gputwin.core.data.synth:cmd_data",
}


def _arm_command(sub: argparse._SubParsersAction, name: str, help: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help, description=help)
    p.add_argument("arm", help="arm name (as shown by `gputwin status`)")
    p.add_argument("-x", "--experiment", help="experiment name (default: the most recent one)")
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gputwin",
        description="Run LoRA fine-tuning arms side by side, watch them live, and get a verdict on which to keep. "
        "With no command: attach to the most recent experiment.",
    )
    parser.add_argument("--version", action="version", version=f"gputwin {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("run", help="start the arms of an experiment (detached) and watch them",
                       description="Start one trainer per arm, detached from this terminal, and open the UI. "
                       "Quitting the UI or losing the terminal never stops training.")
    p.add_argument("paths", nargs="+", metavar="EXPERIMENT_OR_PROFILES", help="an experiment .toml, or two or more arm profiles")
    p.add_argument("--name", help="experiment name (default: from the experiment file or the arm names)")
    p.add_argument("--headless", action="store_true", help="print progress lines and the verdict instead of the UI; exit when all arms end")
    p.add_argument("--replicates", type=int, default=None, metavar="N",
                   help="run every arm N more times with the next seeds (rules.replicates): the verdict's "
                        "intervals then include the run-to-run noise")
    p.add_argument("--cotrain", choices=["auto", "on", "off"], default=None,
                   help="[placement] cotrain: train arms that share a base model in one process (docs/profiles.md)")
    p.add_argument("--new", action="store_true", help="start the arms under a fresh name (NAME-2, ...) even when "
                   "the experiment is running; without it a running experiment is attached to")
    p.add_argument("--ray", metavar="ADDRESS", help="run the arms on the Ray cluster at ADDRESS (HOST:PORT of its "
                   "head, or auto) instead of this machine; as [placement] backend = \"ray\" (docs/cluster.md)")

    p = sub.add_parser("attach", help="open the UI on a running or finished experiment")
    p.add_argument("name", nargs="?", help="experiment name (default: the most recent one)")

    p = sub.add_parser("demo", help="the embedded CPU demo: two arms to a verdict in a few minutes")
    p.add_argument("--headless", action="store_true", help="print progress lines instead of the UI")
    p.add_argument("--new", action="store_true", help="start another demo even while one is running "
                   "(without it, a running demo is attached to)")
    p.add_argument("--ray", metavar="ADDRESS", help="run the demo's arms on the Ray cluster at ADDRESS (docs/cluster.md)")

    p = sub.add_parser("serve", help="the UI in a web browser (textual-serve), bound to this machine by default",
                       description="Serve the UI of an experiment over HTTP: each browser tab gets its own copy of "
                       "the UI. Anyone who can reach the address can stop and extend arms.")
    p.add_argument("name", nargs="?", help="experiment name or folder (default: the most recent one)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--public-url", help="the URL browsers use to reach the server, when it is not http://HOST:PORT")

    p = sub.add_parser("status", help="one-shot summary of an experiment (for scripts, cron and SSH)",
                       description="One-shot summary of an experiment. Exit status: 0; 3 when an arm crashed or "
                       "failed; 2 on a user error.")
    p.add_argument("name", nargs="?", help="experiment name (default: the most recent one)")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    _arm_command(sub, "stop", "stop an arm: it finishes its step, checkpoints and exits")
    p = _arm_command(sub, "extend", "train an arm for more epochs (also after it finished)")
    p.add_argument("--epochs", type=int, default=1, help="epochs to add (default 1)")
    _arm_command(sub, "validate-now", "validate an arm's current adapter without stopping it")
    _arm_command(sub, "resume", "restart a stopped or crashed arm from its last checkpoint")

    p = sub.add_parser("validate", help="validate an adapter or model on held-out PII samples (P/R/F1)")
    p.add_argument("--model", required=True, help="adapter folder (adapter_config.json) or model folder")
    p.add_argument("--test-data", required=True, help="JSONL test file")
    p.add_argument("--sample-size", type=int, default=500, help="number of test samples (default 500)")
    p.add_argument("--seed", type=int, default=1234, help="seed for the sample (same seed = same samples)")
    p.add_argument("--base", help="base model when the adapter's is not on this machine (a copy of it; "
                   "another model is refused)")
    p.add_argument("--task", choices=["generate", "tag"],
                   help="task head when the adapter does not record one (default: read from the adapter)")
    p.add_argument("--batch-size", type=int, default=0, help="samples per batch (default: chosen for the device)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--max-length", type=int, default=0,
                   help="tokens per sample before truncation (default: the adapter's gputwin.json, else 512)")
    p.add_argument("--decoder", choices=["fast", "plain"], default="fast",
                   help="generate head: gputwin's fast greedy decoder (default) or transformers' generate")
    p.add_argument("--json", dest="json_out", help="write the full result to this file")

    p = sub.add_parser("report", help="write comparison.md and verdict.json for an experiment")
    p.add_argument("name", nargs="?", help="experiment name or folder (default: the most recent one)")

    p = sub.add_parser("export", help="write an experiment's arms as TensorBoard runs (one per arm)")
    p.add_argument("--tensorboard", required=True, metavar="DIR", help="folder for the runs: DIR/NAME/ARM/")
    p.add_argument("name", nargs="?", help="experiment name or folder (default: the most recent one)")

    p = sub.add_parser("check", help="validate profiles and print the figures to plan with, side by side")
    p.add_argument("profiles", nargs="+", help="arm profiles or an experiment file")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser("data", help="datasets: make a synthetic PII corpus, inspect a file")
    dsub = p.add_subparsers(dest="data_command", metavar="DATA_COMMAND", required=True)
    s = dsub.add_parser("synth", help="generate a synthetic PII corpus with Faker")
    s.add_argument("--out", required=True, help="output folder (train.jsonl and test.jsonl are written there)")
    s.add_argument("--train", type=int, default=3516, help="training samples (default 3516 = 879 steps x batch 4)")
    s.add_argument("--test", type=int, default=600, help="test samples (default 600)")
    s.add_argument("--locales", default="en_US,zh_CN", help="comma-separated Faker locales (default en_US,zh_CN)")
    s.add_argument("--seed", type=int, default=0, help="seed; the same seed gives the same files")
    s = dsub.add_parser("inspect", help="read a dataset file and report its layout, entity types and bad lines")
    s.add_argument("path", help="JSONL file")
    return parser


def _version() -> str:
    from .. import __version__

    return __version__


def _handler(command: str) -> Callable[[argparse.Namespace], int]:
    module, func = HANDLERS[command].split(":")
    return getattr(importlib.import_module(module), func)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    command = args.command or "attach"
    if command == "attach" and not hasattr(args, "name"):
        args.name = None
    try:
        return int(_handler(command)(args) or 0)
    except UserError as exc:
        print(f"gputwin: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `gputwin status | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
