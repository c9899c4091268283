"""gputwin inside your own Hugging Face Trainer script.

    from gputwin.callback import GputwinCallback

    cb = GputwinCallback("my-experiment", "lr-3e-4", milestone_step=879)
    trainer = Trainer(..., callbacks=[cb])
    trainer.train()
    cb.log_validation({"precision": 0.91, "recall": 0.88, "f1": 0.895})

The callback writes the same arm folder and events as gputwin's own trainer, so `gputwin attach`,
`gputwin status` and the report show the run, and it honours `gputwin stop` (the Trainer saves a
checkpoint and ends). `extend` and `validate-now` need gputwin's own trainer: the request is
consumed and a message saying so goes to stderr.

Importing this module is cheap; transformers is imported when ``GputwinCallback`` is first used.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Mapping

import psutil

from .control import requests as control
from .core import paths
from .core import events as ev
from .reading.eventlog import EventWriter
from .core.errors import UserError
from .core.paths import ArmPaths, ExperimentPaths, make_private_dir, write_atomic
from .core.profiles import DataSpec, Experiment, LoraSpec, MilestoneSpec, ModelSpec, Profile, Rules, TrainSpec
from .control.supervise import arm_alive, read_pid

SOURCE_PREFIX = "hf-trainer:"  # Profile.source of arms run by this callback: gputwin cannot respawn them
STEP_EVENT_EVERY_S = 1.0  # between logged steps, progress-only step events at most this often
METRIC_KEYS = ("precision", "recall", "f1")


def _experiment_paths(experiment: str | os.PathLike[str]) -> ExperimentPaths:
    """A folder path (anything with a slash, or an existing folder) or a name under the logs root."""
    text = os.fspath(experiment)
    if os.sep in text or Path(text).is_dir():
        return ExperimentPaths(Path(text).expanduser().resolve())
    try:
        return paths.experiment(text)
    except ValueError as exc:
        raise UserError(f"GputwinCallback: {exc}", "pass a name such as \"my-experiment\" or a folder path") from None


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


class _GputwinCallbackLogic:
    """The callback's behaviour; combined with transformers.TrainerCallback on first use."""

    def __init__(self, experiment: str | os.PathLike[str], arm: str, milestone_step: int | None = None) -> None:
        if not paths.valid_name(arm):
            raise UserError(f"GputwinCallback: invalid arm name {arm!r}", paths.NAME_HINT)
        if milestone_step is not None and milestone_step < 1:
            raise UserError(f"GputwinCallback: milestone_step must be >= 1, got {milestone_step}")
        self.exp = _experiment_paths(experiment)
        self.arm: ArmPaths = self.exp.arm(arm)
        self.milestone_step = milestone_step
        make_private_dir(self.exp.root)
        make_private_dir(self.arm.root)
        self._writer: EventWriter | None = None
        self._stop_by: str | None = None
        self._last_step_event = 0.0
        self._step = 0
        self.validation_requested = False  # set by `gputwin validate-now`; log_validation clears it

    # ------------------------------------------------------------ files

    def _emit(self, kind: str, **fields: Any) -> None:
        if self._writer is None:
            self._writer = EventWriter(self.arm.events, fold=True)
        self._writer.emit(kind, **fields)

    def _register(self, profile: Profile) -> None:
        """Write profile.json and add the arm to experiment.json (made when absent), under the run lock."""
        write_atomic(self.arm.profile_json, json.dumps(profile.to_dict(), indent=2) + "\n")
        fd = os.open(self.exp.lock, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                experiment = Experiment.from_dict(json.loads(self.exp.experiment_json.read_text(encoding="utf-8")))
            except FileNotFoundError:
                experiment = Experiment(self.exp.name, (), Rules(baseline=profile.name), source=profile.source)
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise UserError(f"{self.exp.experiment_json}: cannot be read ({exc})",
                                "use another experiment name, or remove the damaged file") from None
            arms = tuple(a for a in experiment.arms if a.name != profile.name) + (profile,)
            order = {name: i for i, name in enumerate(experiment.arm_names)}
            arms = tuple(sorted(arms, key=lambda a: order.get(a.name, len(order))))
            updated = Experiment(experiment.name, arms, experiment.rules, experiment.source)
            write_atomic(self.exp.experiment_json, json.dumps(updated.to_dict(), indent=2) + "\n")
        finally:
            os.close(fd)

    def _claim_arm(self) -> None:
        """One live process per arm; a pid file lets `status` tell a crash from a run in progress."""
        recorded = read_pid(self.arm)
        if recorded is not None and recorded[0] != os.getpid() and arm_alive(self.arm):
            raise UserError(f"arm {self.arm.name} of experiment {self.exp.name} is running in process {recorded[0]}",
                            "give this run another arm name, or stop that one first")
        self.arm.exit.unlink(missing_ok=True)
        created = psutil.Process().create_time()
        write_atomic(self.arm.pid, f"{os.getpid()} {created:.3f}\n")

    # ------------------------------------------------------------ profile from the Trainer's arguments

    def _profile(self, args: Any, model: Any) -> Profile:
        config = getattr(model, "config", None)
        base = getattr(config, "_name_or_path", "") or type(model).__name__
        lora = LoraSpec(r=0, alpha=0, dropout=0.0, target_modules=())  # no adapter: full fine-tuning
        peft_config = getattr(model, "peft_config", None)
        if isinstance(peft_config, Mapping) and peft_config:
            adapter = next(iter(peft_config.values()))
            targets = getattr(adapter, "target_modules", None) or ()
            lora = LoraSpec(r=int(getattr(adapter, "r", 0)), alpha=int(getattr(adapter, "lora_alpha", 0)),
                            dropout=float(getattr(adapter, "lora_dropout", 0.0)),
                            target_modules=tuple(sorted(targets)) if not isinstance(targets, str) else (targets,))
        classes = [type(model).__name__] + list(getattr(config, "architectures", None) or [])
        task = "tag" if any("TokenClassification" in c for c in classes) else "generate"
        dtype = "bf16" if args.bf16 else "fp16" if args.fp16 else "auto"
        device = args.device
        return Profile(
            name=self.arm.name,
            model=ModelSpec(base=str(base), task=task, dtype=dtype),
            lora=lora,
            train=TrainSpec(
                learning_rate=float(args.learning_rate), batch_size=int(args.per_device_train_batch_size),
                epochs=float(args.num_train_epochs), max_length=0, warmup_steps=int(args.warmup_steps or 0),
                scheduler=str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)),
                seed=int(args.seed), checkpoint_every=int(args.save_steps or 0),
                keep_checkpoints=int(args.save_total_limit or 0), output_dir=str(args.output_dir),
                grad_clip=float(args.max_grad_norm or 0.0), weight_decay=float(args.weight_decay),
                engine="hf-trainer", threads=0,
            ),
            data=DataSpec(train="", test=""),
            milestone=MilestoneSpec(step=self.milestone_step, epoch=None, sample_size=0),
            device=(device.index or 0) if device.type == "cuda" else None,
            source=SOURCE_PREFIX + str(Path(sys.argv[0]).resolve() if sys.argv and sys.argv[0] else "python"),
        )

    # ------------------------------------------------------------ Trainer hooks

    def on_train_begin(self, args: Any, state: Any, control_: Any, **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        self._claim_arm()
        self._register(self._profile(args, kwargs.get("model")))
        self._stop_by = None
        self._step = int(state.global_step)
        loader = kwargs.get("train_dataloader")
        dataset = getattr(loader, "dataset", None)
        samples = len(dataset) if dataset is not None and hasattr(dataset, "__len__") else None
        epochs = float(args.num_train_epochs or 0)
        steps_per_epoch = None
        if loader is not None and hasattr(loader, "__len__"):
            steps_per_epoch = max(1, len(loader) // max(1, int(args.gradient_accumulation_steps)))
        elif epochs and args.max_steps <= 0:
            steps_per_epoch = max(1, round(state.max_steps / epochs))
        self._emit(ev.STARTED, arm=self.arm.name, pid=os.getpid(), device=str(args.device), samples=samples,
                   steps_per_epoch=steps_per_epoch, total_steps=int(state.max_steps),
                   milestone_step=self.milestone_step, step=self._step, engine="hf-trainer")

    def on_log(self, args: Any, state: Any, control_: Any, logs: Mapping[str, Any] | None = None,
               **kwargs: Any) -> None:
        if not state.is_world_process_zero or not logs or "loss" not in logs:
            return  # evaluation and end-of-training summaries carry no training loss
        self._step_event(state, logs)

    def on_step_end(self, args: Any, state: Any, control_: Any, **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        self._step = int(state.global_step)
        if not control_.should_log and time.monotonic() - self._last_step_event >= STEP_EVENT_EVERY_S:
            self._step_event(state, None)  # progress for the ETA between logged losses
        if self.milestone_step is not None and state.global_step == self.milestone_step:
            self._emit(ev.MILESTONE, step=self._step)
        self._handle_requests(control_)

    def on_save(self, args: Any, state: Any, control_: Any, **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        self._emit(ev.CHECKPOINT, step=int(state.global_step), path=str(path.resolve()))

    def on_train_end(self, args: Any, state: Any, control_: Any, **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        step = int(state.global_step)
        if self._stop_by is not None:
            self._emit(ev.STOPPED, step=step, by=self._stop_by)
        else:
            self._emit(ev.FINISHED, step=step)
        self.arm.pid.unlink(missing_ok=True)  # training is over; the script itself may go on

    # ------------------------------------------------------------ helpers

    def _step_event(self, state: Any, logs: Mapping[str, Any] | None) -> None:
        logs = logs or {}
        epoch = _number(logs.get("epoch"))
        self._emit(ev.STEP, step=int(state.global_step), epoch=epoch if epoch is not None else _number(state.epoch),
                   loss=_number(logs.get("loss")), lr=_number(logs.get("learning_rate")),
                   grad_norm=_number(logs.get("grad_norm")))
        self._last_step_event = time.monotonic()

    def _handle_requests(self, control_: Any) -> None:
        for path, request in control.pending(self.arm.control):
            control.consume(path)
            if isinstance(request, control.ControlError):
                print(f"gputwin: ignored bad control request {path.name}: {request}", file=sys.stderr)
            elif request.action == control.STOP:
                self._stop_by = request.by
                control_.should_training_stop = True
                control_.should_save = True  # a checkpoint to resume from
            elif request.action == control.EXTEND:
                print(f"gputwin: extend request for arm {self.arm.name} ignored: extending needs gputwin's own "
                      "trainer (gputwin run); with your own Trainer, raise num_train_epochs and resume from the "
                      "last checkpoint", file=sys.stderr)
            elif request.action == control.VALIDATE:
                self.validation_requested = True
                print(f"gputwin: validate-now request for arm {self.arm.name}: your script validates; call "
                      "callback.log_validation(metrics) with precision, recall and f1", file=sys.stderr)

    # ------------------------------------------------------------ validation

    def log_validation(self, metrics: Mapping[str, Any], *, step: int | None = None) -> None:
        """Record entity-level precision/recall/F1 (fractions 0..1; an "eval_" prefix is accepted).

        Other numeric entries (e.g. sample_size) are kept in the event.
        """
        values = {k.removeprefix("eval_"): v for k, v in metrics.items()}
        missing = [k for k in METRIC_KEYS if _number(values.get(k)) is None]
        if missing:
            raise ValueError(f"log_validation needs numeric {', '.join(missing)}; got keys {sorted(metrics)}")
        for key in METRIC_KEYS:
            if not 0.0 <= float(values[key]) <= 1.0:
                raise ValueError(f"log_validation: {key} must be a fraction from 0 to 1, got {values[key]!r}")
        reserved = {*METRIC_KEYS, "step", "kind", "t", "v"}
        extra = {k: v for k, v in values.items() if k not in reserved and _number(v) is not None}
        self._emit(ev.VALIDATION, **extra, step=self._step if step is None else int(step),
                   **{k: float(values[k]) for k in METRIC_KEYS})
        self.validation_requested = False

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


_class: type | None = None


def __getattr__(name: str) -> Any:
    """``GputwinCallback`` is built on first use so that importing gputwin never imports transformers."""
    global _class
    if name != "GputwinCallback":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if _class is None:
        from transformers import TrainerCallback

        _class = type("GputwinCallback", (_GputwinCallbackLogic, TrainerCallback), {
            "__doc__": "A transformers TrainerCallback that makes a Trainer run a gputwin arm (see gputwin.callback).",
            "__module__": __name__,
        })
    return _class
