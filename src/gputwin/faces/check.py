"""`gputwin check`: the resolved profiles side by side, with what each arm will do (samples, steps,
milestone, LoRA parameters) and which fused paths its model takes, before anything starts.

It builds each model on the meta device (gputwin.train.modelshape), so unlike the other faces it imports torch.
A check comes before a run: it leaves a warm server starting (gputwin.control.warmstart.ahead), so that the run
that follows starts its arms with their imports done.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from typing import Any

from ..core.placement import cotrain_groups
from ..core.profiles import differing_keys, flatten, load_any


DERIVED_ROWS = [
    ("samples", "samples (train)"),
    ("steps_per_epoch", "steps per epoch"),
    ("total_steps", "total steps"),
    ("milestone_step", "milestone step"),
    ("trainable_params", "LoRA trainable params"),
    ("base_params", "base model params"),
]


def _fmt(value: Any, *, commas: bool = False) -> str:
    if isinstance(value, bool) or value is None:
        return str(value).lower() if isinstance(value, bool) else "-"
    if isinstance(value, int):
        return f"{value:,}" if commas else str(value)
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value))
    return str(value)


def _paths_cell(paths: dict[str, dict[str, Any]]) -> str:
    if "fast_engine" in paths:
        return "plain engine"
    on = [name for name, s in paths.items() if s["on"]]
    off = [name for name, s in paths.items() if not s["on"]]
    return ", ".join(on) + " on" + (f"; {', '.join(off)} off" if off else "") if on else "all off"


def _process_cell(name: str, groups: list[list[str]]) -> str:
    """Whether the arm trains in a process of its own or co-trained with others ([placement] cotrain)."""
    group = next(g for g in groups if name in g)
    others = [n for n in group if n != name]
    return f"co-trained with {', '.join(others)}" if others else "its own"


def _warm_ahead(environment: dict[str, str]) -> str:
    """A warm server for the run that follows this check (gputwin.control.warmstart.ahead), and the line that says
    so. `environment`: os.environ as the command began, as a `gputwin run` from this shell will see it (torch's
    imports here add to os.environ, and a server must match the run's environment to serve it)."""
    from ..control.bytecode import child_env
    from ..control.warmstart import ahead

    return ahead(child_env(environment))


def cmd_check(args: Any) -> int:
    environment = dict(os.environ)  # before any import below adds to it
    from rich.console import Console
    from rich.table import Table

    experiment = load_any(args.profiles, check_files=True)
    json_out = getattr(args, "json", False)
    # arms started here: their imports can be done before the run comes (the server imports beside this check)
    warm = "" if json_out or experiment.placement.backend == "ray" else _warm_ahead(environment)
    from ..train.modelshape import fast_paths, plan_with_params  # (torch)

    arms = list(experiment.arms)
    plans = [plan_with_params(a) for a in arms]
    paths = [fast_paths(a) for a in arms]
    differ = set(differing_keys(arms))
    placement = experiment.placement
    groups = cotrain_groups(arms, "off" if placement.backend == "ray" else placement.cotrain)  # (a cluster: apart)
    if json_out:
        reference = None if experiment.reference is None else asdict(experiment.reference)
        print(json.dumps({"experiment": experiment.name, "differing_keys": sorted(differ),
                          "arms": [{"profile": a.to_dict(), "from_adapter": list(a.from_adapter), "plan": asdict(p),
                                    "fast_paths": f} for a, p, f in zip(arms, plans, paths)],
                          "reference": reference, "cotrain": experiment.placement.cotrain, "processes": groups},
                         indent=2))
        return 0
    console = Console()
    table = Table(title=f"gputwin check: {experiment.name}", title_justify="left", show_lines=False)
    table.add_column("key", style="dim", no_wrap=True)
    for arm in arms:
        table.add_column(arm.name + (" (baseline)" if arm.name == experiment.rules.baseline else ""))
    flats = [flatten(a) for a in arms]
    for key in [k for k in flats[0] if k not in {"name", "source"}]:
        marker = "≠ " if key in differ else "  "
        style = "bold yellow" if key in differ else None
        cells = ["cpu" if key == "device" and f.get(key) is None else _fmt(f.get(key)) for f in flats]
        table.add_row(marker + key, *cells, style=style)
    table.add_section()
    for attr, label in DERIVED_ROWS:
        values = [getattr(p, attr) for p in plans]
        marker = "≠ " if len(set(values)) > 1 else "  "
        table.add_row(marker + label, *[_fmt(v, commas=True) for v in values], style="bold" if marker.strip() else None)
    table.add_row("  fast paths", *[_paths_cell(f) for f in paths])
    table.add_row("  process", *[_process_cell(a.name, groups) for a in arms])
    console.print(table)
    notes = [f"{a.name}: {p.samples_note}" for a, p in zip(arms, plans) if p.samples_note]
    notes += [f"{a.name}: {', '.join(a.from_adapter)} taken from the init adapter {a.model.init_adapter}"
              for a in arms if a.from_adapter]
    notes += [f"{a.name}: {name} off: {s['why']}" for a, f in zip(arms, paths) for name, s in f.items()
              if not s["on"] and name != "fast_engine"]
    if experiment.reference is not None:
        from ..core.paths import logs_root
        from ..reading.reference_file import REFERENCE_DIR, RESULT_FILE, inputs_for

        out = logs_root() / experiment.name / REFERENCE_DIR / RESULT_FILE
        notes.append(f"reference {experiment.reference.name}: validated before the arms start (unless cached) "
                     f"with `{inputs_for(experiment).command(out)}`")
    for note in notes:
        console.print(f"note: {note}")
    if any("fast_engine" not in f for f in paths):
        import peft
        import transformers

        console.print(f"fast paths: checked against transformers {transformers.__version__} and peft "
                      f"{peft.__version__}; they engage on CUDA", style="dim")
    console.print("≠ marks the keys that differ between arms.", style="dim")
    if warm:
        console.print(warm, style="dim")
    return 0
