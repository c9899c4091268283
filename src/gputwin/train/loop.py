"""The trainer of one arm: `train(arm_dir)` runs it to the end, a stop, or a failure.

It talks to the rest of gputwin only through files in the arm folder: it reads profile.json, appends
events.jsonl, polls control/ between steps, and writes checkpoints, adapters and validation results.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from ..control import requests as control
from ..core import events
from ..reading.eventlog import EventWriter
from ..core.errors import UserError
from ..validate.modeling import count_params, count_trainable, save_adapter
from ..validate.predict import keeping_decoders
from ..core.paths import ArmPaths, make_private_dir
from ..core.profiles import Profile, load_resolved
from . import faults
from .batching import EpochBatches, batch_tokens
from .checkpoint import (DISK_FULL_ERRNOS, BackgroundWrite, CheckpointWriteError, TrainState, checkpoint_name,
                         clean_leftovers, latest_loadable, list_checkpoints, load_checkpoint, prune, rng_states,
                         save_checkpoint, set_rng_states, take_snapshot, write_snapshot)
from .engine import NonFiniteLoss, Outcome, StepOutput
from . import origin, probe
from ..core.schedule import decay_done, extension_preview, lr_at, make_plan, wsd_rewind_step
from .setup import Run, TrainFailure, build_run

NAN_HINT = ("lower train.learning_rate (e.g. halve it), add warmup_steps, or keep grad_clip at 1.0; "
            "resume continues from the last checkpoint before the divergence")
OOM_HINT = "lower train.batch_size or train.max_length (or free the GPU of other processes)"
DISK_HINT = ("free space on that disk (or lower train.keep_checkpoints), then `gputwin resume {arm}`: it continues "
             "from the last complete checkpoint")


class StopSignal:
    """SIGTERM/SIGINT set a flag; the loop finishes the step it is in, checkpoints and stops."""

    def __init__(self) -> None:
        self.received: str | None = None

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signal.Signals(signum).name

    @contextmanager
    def installed(self) -> Iterator[StopSignal]:
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


@dataclass(frozen=True)
class Batch:
    """The next step's work: its number, its examples (at the data position) and its lr."""

    step: int
    examples: list[Any]
    lr: float
    started: float  # perf_counter before the batch was built


@dataclass(frozen=True)
class Issued:
    """A step given to the engine: what its event will say besides the loss and gradient norm."""

    step: int
    lr: float
    samples: int
    tokens: int
    samples_seen: int
    tokens_seen: int
    started: float  # perf_counter before its batch was built
    outcome: Outcome  # .result() -> StepOutput, waiting for the device if needed


class Trainer:
    """The loop and what happens between its steps (control requests, checkpoints, validation)."""

    def __init__(self, run: Run, writer: EventWriter, stop: StopSignal,
                 imports_seconds: float | None = None) -> None:
        self.run, self.writer, self.stop = run, writer, stop
        self.imports_seconds = imports_seconds  # process start to train(): Python, torch and the rest
        self.fault = faults.fault_from_env()
        t = run.profile.train
        plan = make_plan(t.learning_rate, t.warmup_steps, t.scheduler, run.total_steps, t.decay_fraction)
        self.state = TrainState(step=0, epoch=0, index=0, plan=plan)
        self.batches = EpochBatches(len(run.examples), t.batch_size, t.seed)  # the data order, from the seed
        self.saved: dict[str, Any] | None = None  # state of the last checkpoint written or loaded
        self.saved_path: Path | None = None
        self.saving: tuple[BackgroundWrite, dict[str, Any]] | None = None  # a checkpoint being written on a thread
        self.stop_request: control.Request | None = None
        self.issued: Issued | None = None  # a step given to the engine whose event is not written yet
        self.reported_step = 0  # the last step whose event is in the log
        self.last_done = 0.0  # perf_counter when the last reported step's figures were read
        self.started_extra: dict[str, Any] = {}  # more fields of the started event (a co-trained arm's partners)
        self.probe_due = 0  # cooldown steps the milestone asked to probe, not run yet
        self.defer_probes = False  # True: the probe waits for run_due_probe (a co-trained group's arms)

    # ------------------------------------------------------------------ the loop

    def train(self) -> int:
        self.begin()
        while True:
            ended = self.between_steps()
            if ended is not None:
                return ended
            batch = self.next_batch()
            engine = self.run.engine
            try:
                outcome = engine.step(engine.collate(batch.examples), batch.lr)
            except NonFiniteLoss as exc:
                raise NonFiniteLoss(f"{exc} at step {batch.step}") from None
            self.advance(batch, outcome)

    # The loop's parts, also stepped by a co-trained group (gputwin.train.cotrain), one arm each.

    def begin(self) -> None:
        """Resume from the newest checkpoint that loads (it continues the run exactly), and say so."""
        run = self.run
        for root in (run.checkpoint_root, self.decay_start_root):
            clean_leftovers(root)
        resumed = latest_loadable(run.checkpoint_root, run.model, run.optimizer, run.fingerprint, run.device)
        if resumed is not None:
            self.state, self.saved_path = resumed
            self.saved = self.state.to_dict()
            self.reported_step = self.state.step
        self.emit_started()
        self.plan_shapes()
        if resumed is not None:
            self.writer.emit(events.RESUMED, step=self.state.step, checkpoint=str(self.saved_path))
            if self.at_milestone():  # the last run ended between the milestone checkpoint and its validation
                self.milestone()

    def plan_shapes(self) -> None:
        """Tell an engine that plans its batch shapes (train/shapeplan.py) the batches of the steps to come."""
        plan = getattr(self.run.engine, "plan", None)
        if plan is not None:
            plan(self.upcoming())

    def upcoming(self) -> Iterator[list[Any]]:
        """The examples of every step still planned, in order (the data order is the seed's)."""
        run, state = self.run, self.state
        order = EpochBatches(len(run.examples), run.profile.train.batch_size, run.profile.train.seed)
        epoch, index = state.epoch, state.index
        for _ in range(state.plan.total_steps - state.step):
            yield [run.examples[i] for i in order.indices(epoch, index)]
            epoch, index = (epoch + 1, 0) if index + 1 >= run.steps_per_epoch else (epoch, index + 1)

    def between_steps(self) -> int | None:
        """Requests and signals; the exit code once the arm has ended (stopped or done), else None."""
        if self.saving is not None and self.saving[0].done():
            self.finish_saving()
        self.poll_control()
        if self.stop_request is not None or self.stop.received:
            return self.finish_stopped()
        if self.state.step >= self.state.plan.total_steps:
            return self.finish_done()
        return None

    def next_batch(self) -> Batch:
        """The batch at the data position and its lr from the plan."""
        run, state = self.run, self.state
        started = time.perf_counter()
        step = state.step + 1
        examples = [run.examples[i] for i in self.batches.indices(state.epoch, state.index)]
        faults.before_step(self.fault, step, run.model)
        return Batch(step=step, examples=examples, lr=lr_at(step, state.plan), started=started)

    def advance(self, batch: Batch, outcome: Outcome) -> None:
        """The step is issued: advance the position, report it, and do what falls due after it."""
        run, state = self.run, self.state
        # -- advance the position; the step's event is written once its loss is read (settle)
        step, examples = batch.step, batch.examples
        tokens = batch_tokens(examples)
        state.step, state.index = step, state.index + 1
        if state.index >= run.steps_per_epoch:
            state.epoch, state.index = state.epoch + 1, 0
        state.samples_seen += len(examples)
        state.tokens_seen += tokens
        issued = Issued(step=step, lr=batch.lr, samples=len(examples), tokens=tokens, samples_seen=state.samples_seen,
                        tokens_seen=state.tokens_seen, started=batch.started, outcome=outcome)
        # The previous step's loss is read while the device already runs this one: reading a loss
        # waits for its step, and waiting every step would leave the device idle between steps.
        self.settle()
        self.issued = issued
        if isinstance(outcome, StepOutput):  # known already (a synchronous engine): report it now
            self.settle()
        faults.after_step(self.fault, step)

        # -- milestone (checkpoint, adapter, validation of the live model), else a periodic checkpoint
        if self.at_milestone():
            self.milestone()
        elif step % run.profile.train.checkpoint_every == 0:
            self.checkpoint(background=True)
        if state.plan.scheduler == "wsd" and step == state.plan.decay_start < state.plan.total_steps:
            self.keep_decay_start()

    def settle(self) -> None:
        """Write the event of the issued step, waiting for its figures if the device is still on it.

        Everything that must see the log up to date (a checkpoint, a validation, a request, an ending)
        settles first, so the events stay in step order and a checkpoint never precedes its step's event.
        """
        issued, self.issued = self.issued, None
        if issued is None:
            return
        try:
            output = issued.outcome.result()
        except NonFiniteLoss as exc:
            raise NonFiniteLoss(f"{exc} at step {issued.step}") from None
        done = time.perf_counter()
        # from the end of the step before when the device was busy with it: the pace of the run
        seconds = done - max(issued.started, self.last_done)
        self.last_done = done
        faults.before_step_event(self.fault, issued.step, str(self.writer.path))
        self.writer.emit(events.STEP, step=issued.step, epoch=round(issued.step / self.run.steps_per_epoch, 6),
                         loss=output.loss, lr=issued.lr, grad_norm=output.grad_norm, samples=issued.samples,
                         tokens=issued.tokens, samples_seen=issued.samples_seen, tokens_seen=issued.tokens_seen,
                         step_seconds=round(seconds, 6), tokens_per_s=round(issued.tokens / max(seconds, 1e-9), 1))
        self.reported_step = issued.step
        self.run.prepare_validation()  # training runs: the validation's tokenizer work starts on a thread (once)

    # ------------------------------------------------------------------ between steps

    def at_milestone(self) -> bool:
        return self.state.step == self.run.milestone_step and not self.state.milestone_done

    def milestone(self) -> None:
        """Checkpoint first (a failing validation loses no training), then validate the live model.

        The checkpoint, and the adapter the validation names, are copied off first and written on a thread while
        the live model is scored (0.2-0.4 s an arm off the way to the verdict on an H100); the checkpoint's event
        still comes before the validation's, and a validation that fails lets the write land first."""
        self.settle()
        self.finish_saving()  # a periodic checkpoint's event before the milestone's
        self.writer.emit(events.MILESTONE, step=self.state.step)
        adapter = self.adapter_folder()
        self.checkpoint(background=True, adapter=adapter)
        position = self.position()
        cooldown = probe.wanted(position["lr_fraction"], self.run.profile.milestone.cooldown_steps, self.state.step)
        with keeping_decoders():  # the probe's validation decodes with the milestone's decoder, already made
            self.validate(reason="milestone", by="plan", extra={"schedule": {**position, "probe_steps": cooldown}},
                          adapter=adapter)
            self.state.milestone_done = True
            self.probe_due = cooldown
            if not self.defer_probes:
                self.run_due_probe()

    def run_due_probe(self) -> None:
        """The cooldown probe the milestone asked for, if it has not run yet (a group runs its arms' probes once
        every arm at its milestone has been validated: CoTrainer)."""
        steps, self.probe_due = self.probe_due, 0
        if steps:
            self.cooldown_probe(steps)

    def position(self) -> dict[str, Any]:
        """Where the arm stands in its LR schedule after the steps done (recorded with each validation)."""
        step, plan = self.state.step, self.state.plan
        peak = self.run.profile.train.learning_rate
        lr = lr_at(max(step, 1), plan)
        return {"step": step, "lr": lr, "peak_lr": peak, "lr_fraction": round(lr / peak, 6) if peak else 0.0,
                "decay_done": round(decay_done(step, plan), 6), "total_steps": plan.total_steps,
                "scheduler": plan.scheduler}

    def cooldown_probe(self, steps: int) -> None:
        """Score this arm as if its schedule ended now (gputwin.train.probe); the live run is left exactly
        as it was. A probe that fails (NaN, out of memory) is reported and the arm trains on."""
        from ..validate.run import validate

        run, state = self.run, self.state
        position = self.position()
        started = time.perf_counter()
        out_path = run.arm.probe_file(state.step)
        try:
            with probe.side_branch(run.model, run.optimizer):
                trained = probe.train_cooldown(run, self.batches, state.epoch, state.index, position["lr"], steps)
                with self.scoring_model() as model:
                    result = validate(model, run.tokenizer_now(), task=run.profile.model.task,
                                      test_path=run.profile.data.test, sample_size=run.profile.milestone.sample_size,
                                      seed=run.profile.milestone.sample_seed, label_names=run.label_names,
                                      device=run.device, step=state.step, arm=run.profile.name, out_path=out_path,
                                      max_length=run.profile.train.max_length,
                                      decoder="plain" if run.profile.train.engine == "plain" else "fast",
                                      extra={"probe": {"steps": steps, "lr_from": position["lr"],
                                                       "train_seconds": trained["seconds"],
                                                       "loss_first": trained["losses"][0],
                                                       "loss_last": trained["losses"][-1]},
                                             "schedule": {**position, "lr": 0.0, "lr_fraction": 0.0, "decay_done": 1.0,
                                                          "cooled_from": position}})
                run.model.train()
        except (NonFiniteLoss, torch.cuda.OutOfMemoryError) as exc:
            out_path.unlink(missing_ok=True)
            self.writer.emit(events.PROBE, step=state.step, steps=steps, lr_from=position["lr"], failed=str(exc),
                             seconds=round(time.perf_counter() - started, 3))
            return
        self.writer.emit(events.PROBE, step=state.step, steps=steps, lr_from=position["lr"],
                         precision=result["precision"], recall=result["recall"], f1=result["f1"], path=str(out_path),
                         loss_first=trained["losses"][0], loss_last=trained["losses"][-1],
                         train_seconds=trained["seconds"], validate_seconds=result.get("seconds"),
                         **({"graphs": trained["graphs"]} if "graphs" in trained else {}),
                         seconds=round(time.perf_counter() - started, 3))

    def poll_control(self) -> None:
        """Handle waiting requests oldest first; a bad file is removed and reported, never fatal."""
        requests = control.pending(self.run.arm.control)
        if requests:
            self.settle()
        for path, request in requests:
            control.consume(path)
            if isinstance(request, control.ControlError):
                print(f"gputwin: ignored control file {path.name}: {request}", file=sys.stderr)
            elif request.action == control.STOP:
                self.stop_request = request
            elif request.action == control.EXTEND:
                self.extend(request.epochs, request.by)
            elif request.action == control.VALIDATE:
                self.validate(reason="requested", by=request.by)

    def extend(self, epochs: int, by: str) -> None:
        """More epochs. With decay left, the lr continues from where it is and the decay stretches over the
        new end; an arm that has finished, or is in the last part of its decay, starts a new cycle (a short
        warmup to rules.extend_lr of its peak, then its decay shape) so the added steps train."""
        state, per_epoch = self.state, self.run.steps_per_epoch
        peak = self.run.profile.train.learning_rate
        rewound = self.rewind_to_decay_start()
        preview = extension_preview(state.plan, state.step, epochs * per_epoch, profile_peak=peak,
                                    extend_lr=experiment_extend_lr(self.run.arm.root.parent))
        state.plan = plan = preview["plan"]
        self.writer.emit(events.EXTENDED, step=state.step, epochs=round(plan.total_steps / per_epoch, 6),
                         added_epochs=epochs, total_steps=plan.total_steps, lr_plan=plan.to_dict(),
                         lr_next=lr_at(state.step + 1, plan), by=by, new_cycle=preview["new_cycle"],
                         lr_now=preview["lr_now"], lr_peak=preview["lr_peak"], lr_end=preview["lr_end"],
                         lr_curve=[round(x, 10) for x in preview["curve"]],
                         **({"rewound_to": rewound} if rewound is not None else {}))
        self.plan_shapes()  # the added steps' shapes

    # -- wsd: the checkpoint where the decay began, so an extension can hold the peak longer instead

    @property
    def decay_start_root(self) -> Path:
        return self.run.checkpoint_root / "decay-start"

    def keep_decay_start(self) -> None:
        """Keep this step's state apart from the pruned checkpoints: the decay begins after it."""
        self.settle()
        root = self.decay_start_root
        for old in list_checkpoints(root):
            shutil.rmtree(old[1])
        run = self.run
        save_checkpoint(root, self.state, run.model, run.optimizer, run.adapter_meta, run.fingerprint)

    def rewind_to_decay_start(self) -> int | None:
        """A wsd arm extended after its decay began goes back to where it began (weights, optimizer, RNG,
        data position), so the extension holds the peak and decays again at the new end. The checkpoints
        after that step are the abandoned branch and go. Returns the step gone back to, or None."""
        rewind = wsd_rewind_step(self.state.plan, self.state.step)
        kept = [path for step, path in list_checkpoints(self.decay_start_root) if step == rewind]
        if rewind is None or not kept:
            return None
        self.settle()
        self.finish_saving()  # a write in flight lands before the abandoned branch's checkpoints go
        run = self.run
        loaded = load_checkpoint(kept[-1], run.model, run.optimizer, run.fingerprint, run.device)
        for step, path in list_checkpoints(run.checkpoint_root):
            if step > rewind:
                shutil.rmtree(path)
        for f in dataclasses.fields(loaded):  # in place: the loop holds this object
            setattr(self.state, f.name, getattr(loaded, f.name))
        self.saved, self.saved_path, self.reported_step = None, None, loaded.step
        return rewind

    def checkpoint(self, *, background: bool = False, adapter: Path | None = None) -> Path | None:
        """Write a checkpoint unless the last one already holds exactly this state, and return its folder.

        background: copy the state off now and write it on a thread while the run goes on (periodic checkpoints
        while it trains, the milestone's while it validates: a write took 0.13-0.58 s on an H100 machine,
        bench/RESULTS.md); its event comes once it is on disk (finish_saving), and None is returned. Every other
        checkpoint is written before this returns, after any write in flight. adapter: a folder to write the
        adapter to as well, from the same copy (the one a validation names)."""
        self.settle()
        self.finish_saving()
        state = self.state.to_dict()
        run = self.run
        if self.saved == state and self.saved_path is not None and self.saved_path.exists():
            if adapter is not None:
                save_adapter(run.model, adapter, run.adapter_meta)
            return self.saved_path
        step = self.state.step
        started = time.perf_counter()
        snapshot = take_snapshot(self.state, run.model, run.optimizer, run.adapter_meta)

        def write() -> Path:
            path = write_snapshot(run.checkpoint_root, snapshot, run.fingerprint,
                                  half_written=lambda folder: faults.inside_checkpoint(self.fault, step, str(folder)))
            try:
                prune(run.checkpoint_root, run.profile.train.keep_checkpoints, protect=path)
            except OSError as exc:  # this checkpoint is whole: the old ones stay until a later prune
                print(f"gputwin: {run.arm.name}: could not remove an old checkpoint: {exc}", file=sys.stderr,
                      flush=True)
            if adapter is not None:
                save_adapter(snapshot.model, adapter, snapshot.adapter_meta, state_dict=snapshot.trainable)
            return path

        if background:
            self.saving = (BackgroundWrite(write, f"gputwin-checkpoint-{step}"), state)
            return None
        path = write()
        self.saved_checkpoint(state, path, time.perf_counter() - started)
        return path

    def finish_saving(self) -> None:
        """Wait for the checkpoint being written in the background, if any, and write its event; a write that
        failed raises here (CheckpointWriteError), as it would have in checkpoint()."""
        if self.saving is None:
            return
        (write, state), self.saving = self.saving, None
        self.saved_checkpoint(state, write.result(), write.seconds, background=True)

    def saved_checkpoint(self, state: dict[str, Any], path: Path, seconds: float, background: bool = False) -> None:
        self.saved, self.saved_path = state, path
        self.writer.emit(events.CHECKPOINT, step=state["step"], path=str(path), seconds=round(seconds, 3),
                         **({"background": True} if background else {}))

    def adapter_folder(self) -> Path:
        """Where this step's adapter goes (adapters/step-NNNNNN)."""
        return make_private_dir(self.run.arm.root / "adapters") / checkpoint_name(self.state.step)

    def save_adapter(self) -> Path:
        return save_adapter(self.run.model, self.adapter_folder(), self.run.adapter_meta)

    @contextmanager
    def scoring_model(self) -> Iterator[Any]:
        """The model that validation scores: the arm's own (a co-trained arm's yields the shared model
        with only its adapter active)."""
        yield self.run.model

    def validate(self, *, reason: str, by: str, extra: dict[str, Any] | None = None,
                 adapter: Path | None = None) -> dict[str, Any]:
        """Save the adapter (unless `adapter`: a write in flight puts it there), then score the live model on
        held-out samples; training resumes unchanged. A checkpoint written meanwhile lands, with its event,
        before the validation's event."""
        from ..validate.run import validate

        run, step = self.run, self.state.step
        adapter = adapter if adapter is not None else self.save_adapter()
        rng = rng_states()  # validation must not shift the training run's random stream
        make_private_dir(run.arm.validation)
        out_path = run.arm.validation_file(step)
        with self.scoring_model() as model:
            result = validate(model, run.tokenizer_now(), task=run.profile.model.task, test_path=run.profile.data.test,
                              sample_size=run.profile.milestone.sample_size, seed=run.profile.milestone.sample_seed,
                              label_names=run.label_names, device=run.device, step=step, arm=run.profile.name,
                              out_path=out_path, max_length=run.profile.train.max_length,
                              decoder="plain" if run.profile.train.engine == "plain" else "fast",
                              extra=extra if extra is not None else {"schedule": self.position()})
        run.model.train()
        set_rng_states(rng)
        try:
            self.finish_saving()
        except BaseException:  # a score is recorded with its event only: none for a state that was not saved
            out_path.unlink(missing_ok=True)
            raise
        self.writer.emit(events.VALIDATION, step=step, precision=result["precision"], recall=result["recall"],
                         f1=result["f1"], path=str(out_path), seconds=result.get("seconds"),
                         per_type=per_type_summary(result.get("per_type", {})), sample_size=result.get("n"),
                         adapter=str(adapter), reason=reason, by=by, schedule=result.get("schedule"))
        return result

    # ------------------------------------------------------------------ endings

    def finish_stopped(self) -> int:
        request, state = self.stop_request, self.state
        path = self.checkpoint() if state.step > 0 else None
        if request is not None:
            reason, by = "requested", request.by
        else:
            reason, by = self.stop.received or "signal", "signal"
        self.writer.emit(events.STOPPED, step=state.step, reason=reason, by=by,
                         checkpoint=str(path) if path else None)
        return 0

    def finish_done(self) -> int:
        # An arm that trained on past its milestone is validated again at its end, on the same samples,
        # so the verdict can "compare again" once every arm has finished (scenario B of the seed).
        self.settle()
        step = self.state.step
        if step > self.run.milestone_step and not self.run.arm.validation_file(step).is_file():
            self.validate(reason="final", by="plan")
        path = self.checkpoint()
        adapter = self.save_adapter()
        self.writer.emit(events.FINISHED, step=self.state.step, checkpoint=str(path), adapter=str(adapter),
                         epochs=round(self.state.step / self.run.steps_per_epoch, 6))
        return 0

    def emit_started(self) -> None:
        run, state = self.run, self.state
        self.writer.emit(
            events.STARTED, arm=run.profile.name, pid=os.getpid(), device=run.device_name, engine=run.engine.name,
            fast_paths=getattr(run.engine, "paths", {}),
            config=run.profile.to_dict(), trainable_params=count_trainable(run.model),
            total_params=count_params(run.model), samples=len(run.examples), bad_lines=run.bad_lines,
            truncated=run.truncated, label_names=run.label_names, steps_per_epoch=run.steps_per_epoch,
            total_steps=state.plan.total_steps, milestone_step=run.milestone_step,
            tokens_per_epoch=run.tokens_per_epoch, step=state.step, lr_plan=state.plan.to_dict(),
            startup_seconds={**({"imports": self.imports_seconds} if self.imports_seconds is not None else {}),
                             **run.startup, "process": "warm fork" if origin.FORKED else "fresh"},
            **self.started_extra,
        )


def experiment_extend_lr(experiment_dir: Path) -> float:
    """rules.extend_lr of the experiment the arm belongs to (experiment.json beside the arm folders)."""
    import json

    try:
        rules = json.loads((experiment_dir / "experiment.json").read_text(encoding="utf-8")).get("rules", {})
        value = float(rules.get("extend_lr", 0.5))
    except (OSError, ValueError, TypeError, AttributeError):
        return 0.5
    return value if 0.0 < value <= 1.0 else 0.5


def per_type_summary(per_type: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """precision/recall/f1/support of each entity type (the full counts stay in the validation file)."""
    keys = ("precision", "recall", "f1", "support")
    return {t: {k: v[k] for k in keys if k in v} for t, v in per_type.items() if isinstance(v, dict)}


def disk_full(exc: BaseException) -> bool:
    """ENOSPC/EDQUOT, also where a library reports it only in words (safetensors)."""
    return getattr(exc, "errno", None) in DISK_FULL_ERRNOS or "No space left on device" in str(exc)


def read_profile(arm: ArmPaths) -> Profile:
    return load_resolved(arm.profile_json)


def report_failure(writer: EventWriter, trainer: Trainer | None, arm: ArmPaths, error: str, message: str,
                   hint: str) -> None:
    """The `failed` event (after the event of a step that finished before the failure) and a line on stderr."""
    step = None
    if trainer is not None:
        with contextlib.suppress(Exception):  # a step that finished before the failure keeps its event
            trainer.settle()
        try:  # and a checkpoint being written lands, with its event
            trainer.finish_saving()
        except Exception as exc:  # noqa: BLE001 - it failed too: say so, the resume starts before it
            message += f" (and the checkpoint being written then failed too: {exc})"
        step = trainer.reported_step
    unlogged = ""
    try:
        writer.emit(events.FAILED, error=error, message=message, hint=hint, step=step)
    except OSError as exc:  # the disk under the log is full too: stderr and the exit status remain
        unlogged = f"\n  (this failed event could not be written to {arm.events}: {exc})"
    print(f"gputwin: {arm.name}: {error}: {message}\n  hint: {hint}{unlogged}", file=sys.stderr, flush=True)


def known_failure(exc: Exception, arm: ArmPaths) -> tuple[str, str, str, int] | None:
    """error, message, hint and exit code of a failure reported without a traceback; None for an internal
    error (reported, then re-raised so stderr has the traceback)."""
    if isinstance(exc, TrainFailure):
        return exc.error, exc.message, exc.hint, exc.exit_code
    if isinstance(exc, NonFiniteLoss):
        return "NonFiniteLoss", str(exc), NAN_HINT, 1
    if isinstance(exc, torch.OutOfMemoryError):
        return "OutOfMemory", str(exc).splitlines()[0] if str(exc) else "CUDA out of memory", OOM_HINT, 1
    if isinstance(exc, UserError):
        return type(exc).__name__, exc.message, exc.hint or "see stderr.log", 2
    if isinstance(exc, CheckpointWriteError):
        return ("DiskFull" if exc.errno in DISK_FULL_ERRNOS else "CheckpointWriteFailed", exc.strerror or str(exc),
                DISK_HINT.format(arm=arm.name), 1)
    if disk_full(exc):
        where = getattr(exc, "filename", None) or arm.root
        return ("DiskFull", f"cannot write to {where}: {getattr(exc, 'strerror', None) or exc}",
                DISK_HINT.format(arm=arm.name), 1)
    return None


INTERNAL_HINT = "an internal error: stderr.log has the traceback"


def train(arm_dir: str | Path, *, imports_seconds: float | None = None) -> int:
    """Run the arm in `arm_dir` to its end; the exit code of `python -m gputwin.train`.

    Failures become a `failed` event: known ones (diverged loss, out of memory, user errors) with a
    hint and no traceback; anything else is re-raised after the event so stderr has the traceback.
    """
    arm = ArmPaths(Path(arm_dir).resolve())
    stop = StopSignal()
    with EventWriter(arm.events, fold=True) as writer, stop.installed():
        trainer: Trainer | None = None
        try:
            trainer = Trainer(build_run(arm, read_profile(arm)), writer, stop, imports_seconds)
            return trainer.train()
        except Exception as exc:
            known = known_failure(exc, arm)
            if known is None:
                report_failure(writer, trainer, arm, type(exc).__name__, str(exc), INTERNAL_HINT)
                raise
            report_failure(writer, trainer, arm, *known[:3])
            return known[3]
