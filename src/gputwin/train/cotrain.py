"""Co-training: arms that share a base model train in one process, with one pass of the base for all.

`python -m gputwin.train --group ARM_DIR ARM_DIR...` runs the arms the launcher placed together (same base,
task, device and dtype; `placement.cotrain_groups`). The process loads the base once and gives each arm
its own adapter on it (multilora.SharedModel), its own AdamW, LR plan, data order, checkpoints, event log
and control folder: each arm is a `Trainer` of its own (train/loop.py) whose model is its view of the
shared model and whose engine steps it together with the others.

A step stacks every live arm's batch (each a block of rows), runs the base over all of them at once and
each adapter over its own rows, and backpropagates the sum of the arms' own mean losses: each adapter's
gradient is then exactly the gradient it gets alone. Clipping, the update and the lr are each arm's own.
An arm that ends (finishes, is stopped, fails) is given back at once (supervise.release_arm: its exit is
recorded, so it reads as ended and `gputwin resume`/`extend` start it again in a process of its own),
and the others train on. A failure of the shared step itself (out of memory) ends every arm in it.

With train.engine = "fast" (every arm's) on a device with the checked varlen attention kernel, the step is
the fast engine's, for the group (train/cofast.py: all arms' samples in one packed row, a captured CUDA graph
per shape); otherwise (engine "plain", a CPU, no such kernel) it is the plain engine's: padded batches
stacked, eager (GroupEngine.why_not_packed says which, in the started event). Validation uses the decoder the profile asks for, with only the
validated arm's adapter active, and pauses the other arms while it runs.
"""

from __future__ import annotations

import itertools
import math
import sys
import time
import traceback
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar

import torch
import torch.nn.functional as F

from ..reading.eventlog import EventWriter
from ..kernels.decoder import decoder_parts, varlen_backend
from ..validate.modeling import resolve_dtype
from ..validate.predict import keeping_decoders
from ..core.paths import ArmPaths
from ..core.plan import milestone_step, steps_for
from ..core.profiles import Profile
from ..control.supervise import release_arm
from . import background, tokcache
from .batching import IGNORE_INDEX, Example, collate_padded
from .engine import NonFiniteLoss, StepOutput, autocast_for, build_optimizer, set_lr
from .loop import INTERNAL_HINT, Batch, StopSignal, Trainer, known_failure, read_profile, report_failure
from .multilora import ArmView, Block, NotCoTrainable, SharedModel, adapter_name
from .setup import (Run, TrainFailure, cpu_threads, load_model, load_tokenizer, pick_device,
                    seed_everything)

T = TypeVar("T")
COTRAIN_HINT = "train these arms apart: set cotrain = \"off\" in the experiment's [placement] table"


# ---------------------------------------------------------------- the step


def next_token_targets(labels: torch.Tensor) -> torch.Tensor:
    """The label each position predicts (the next token's), IGNORE_INDEX where there is none."""
    return F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """transformers' causal-LM loss: the mean over label tokens of the next token's cross-entropy, in fp32."""
    return F.cross_entropy(logits.float().flatten(0, 1), next_token_targets(labels).flatten(),
                           ignore_index=IGNORE_INDEX)


def split_head(model: Any) -> tuple[Any, Any] | None:
    """(decoder, lm_head) of a plain causal LM, so the head runs at the answer's positions only: at
    Qwen3's 151,936-token vocabulary the full logits of a padded batch are most of the step's memory. None
    where the model does more than lm_head(hidden) to its logits (a soft cap, a scale)."""
    causal = model.get_base_model()
    config = causal.config
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        return None
    try:
        decoder, head = causal.get_decoder(), causal.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    return (decoder, head) if decoder is not None and head is not None else None


def stack_batches(batches: Sequence[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Padded batches one under another, right-padded to the widest (padding changes no real token's output)."""
    width = max(b["input_ids"].shape[1] for b in batches)
    fill = {"input_ids": pad_id, "attention_mask": 0, "labels": IGNORE_INDEX}
    return {key: torch.cat([F.pad(b[key], (0, width - b[key].shape[1]), value=value) for b in batches])
            for key, value in fill.items()}


@dataclass
class Member:
    """One arm's part of the group step."""

    adapter: str
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    grad_clip: float


class GroupEngine:
    """One forward/backward over every arm's batch; each arm clipped and updated on its own.

    fast: every arm's samples packed in one row and the step captured as a CUDA graph (train/cofast.py);
    else padded batches stacked, eager (the plain engine's step)."""

    def __init__(self, shared: SharedModel, *, device: torch.device, model_dtype: torch.dtype, pad_id: int,
                 fast: bool = False) -> None:
        self.shared, self.device, self.model_dtype, self.pad_id = shared, device, model_dtype, pad_id
        self.members: dict[str, Member] = {}
        self.split = split_head(shared.model)
        self.packed, self.why = False, "train.engine is plain"
        if fast:
            why_not = self.why_not_packed()
            self.packed, self.why = not why_not, why_not or "every arm's samples in one packed row, a CUDA graph a shape"
        self.name = "fast" if self.packed else "plain"
        self.packed_step: Any = None  # cofast.GroupFastStep, built at the first step, once every arm has joined
        self.shapes: Any = None  # the packed rows' shapes (shapeplan.ShapePlan), planned from the steps to come

    def why_not_packed(self) -> str:
        """Why the packed step cannot serve these arms here ("" when it can).

        One packed row keeps the arms apart only where attention runs per sample (the varlen kernel): the
        block-causal-mask fallback multiplies masked-out values by 0, so one arm's inf/NaN would reach the
        others' rows. There, and where an arm adapts the head, the stacked padded step runs instead."""
        try:
            head = decoder_parts(self.shared.model).lm_head
        except TypeError as exc:
            return str(exc)
        if head in self.shared.layers:
            return "an arm adapts the output head (lm_head)"
        if varlen_backend(self.device) != "varlen":
            return "no checked varlen attention on this device to keep the arms' samples apart in one row"
        return ""

    def join(self, view: ArmView, optimizer: torch.optim.Optimizer, grad_clip: float) -> None:
        self.members[view.adapter] = Member(view.adapter, view.trainable(), optimizer, grad_clip)

    def step(self, work: Sequence[tuple[str, Sequence[Example], float]], shapes: Any = None) -> dict[str, Any]:
        """work: (adapter, examples, lr) of each arm stepping now. An arm whose loss is NaN/inf gets a
        NonFiniteLoss (or an outcome raising it) and no update; the others update as if it were not there.
        shapes: the ShapePlan to take the packed row's shape from (None: the group's, plan())."""
        if self.packed:
            return self.step_packed(work, shapes)
        batches = [collate_padded(examples, self.pad_id) for _, examples, _ in work]
        stacked = {k: v.to(self.device, non_blocking=True) for k, v in stack_batches(batches, self.pad_id).items()}
        blocks, row = [], 0
        for (adapter, _, _), batch in zip(work, batches):
            blocks.append((adapter, row, row + len(batch["input_ids"])))
            row = blocks[-1][2]
        losses = self.losses(stacked, blocks)
        values = torch.stack([loss.detach() for loss in losses]).tolist()  # one wait for the device, not one per arm
        finite = [loss for loss, value in zip(losses, values) if math.isfinite(value)]
        if finite:
            torch.stack(finite).sum().backward()  # d(sum)/d(adapter i) = d(loss i)/d(adapter i): rows never mix
        out: dict[str, StepOutput | NonFiniteLoss] = {}
        for (adapter, _, lr), value in zip(work, values):
            member = self.members[adapter]
            if not math.isfinite(value):
                for p in member.params:
                    p.grad = None
                out[adapter] = NonFiniteLoss(f"loss is {value}")
                continue
            max_norm = member.grad_clip if member.grad_clip > 0 else math.inf
            grad_norm = float(torch.nn.utils.clip_grad_norm_(member.params, max_norm))
            set_lr(member.optimizer, lr)
            member.optimizer.step()
            member.optimizer.zero_grad(set_to_none=True)
            out[adapter] = StepOutput(loss=value, grad_norm=grad_norm)
        return out

    def step_packed(self, work: Sequence[tuple[str, Sequence[Example], float]], shapes: Any = None) -> dict[str, Any]:
        """The fast engine's way (train/cofast.py): issued, the figures read later (PendingStep on CUDA)."""
        from .cofast import GroupFastStep, group_need, pack_group

        if self.packed_step is None:
            dtype = torch.bfloat16 if self.device.type == "cuda" and self.model_dtype != torch.float32 else None
            self.packed_step = GroupFastStep(self.shared, self.members, device=self.device, autocast_dtype=dtype)
        rows = [(adapter, examples) for adapter, examples, _ in work]
        batch = pack_group(rows, pad_id=self.pad_id, shape=(shapes or self.plan_of()).shape_for(group_need(rows)))
        outcomes = self.packed_step(batch, [lr for _, _, lr in work])
        return {adapter: outcome for (adapter, _, _), outcome in zip(work, outcomes)}

    def plan(self, steps: Iterable[Sequence[tuple[str, Sequence[Example]]]], shapes: Any = None) -> None:
        """The steps to come, each the (adapter, examples) of every arm in it: their rows' shapes are planned
        now (train/shapeplan.py), in `shapes` (a ShapePlan of new_plan()) or the group's own. The padded step
        pads nothing it need not, so it plans nothing."""
        if self.packed:
            from .cofast import group_need

            (shapes or self.plan_of()).add(group_need(rows) for rows in steps)

    def plan_of(self) -> Any:
        if self.shapes is None:
            self.shapes = self.new_plan()
        return self.shapes

    @staticmethod
    def new_plan() -> Any:
        from .cofast import group_buckets
        from .shapeplan import ShapePlan

        return ShapePlan(group_buckets)

    def losses(self, stacked: dict[str, torch.Tensor], blocks: Sequence[Block]) -> list[torch.Tensor]:
        """Each arm's mean loss over its rows: the decoder once over all rows, the head per arm at the
        positions that have a label (with that arm's adapter, should it adapt the head)."""
        inputs = {"input_ids": stacked["input_ids"], "attention_mask": stacked["attention_mask"]}
        with autocast_for(self.device, self.model_dtype):
            if self.split is None:
                with self.shared.routed(blocks) as model:
                    logits = model(**inputs).logits
                return [causal_lm_loss(logits[start:stop], stacked["labels"][start:stop]) for _, start, stop in blocks]
            decoder, head = self.split
            with self.shared.routed(blocks):
                hidden = decoder(**inputs).last_hidden_state
            targets = next_token_targets(stacked["labels"])
            losses = []
            for adapter, start, stop in blocks:
                keep = targets[start:stop] != IGNORE_INDEX
                rows = hidden[start:stop][keep]  # [label tokens, hidden]: one block, this arm's
                with self.shared.routed([(adapter, 0, len(rows))]):
                    logits = head(rows)
                losses.append(F.cross_entropy(logits.float(), targets[start:stop][keep]))
            return losses


class ArmEngine:
    """The group engine as one arm's engine: what the cooldown probe steps (this arm alone, its side branch)."""

    def __init__(self, group: GroupEngine, adapter: str, partners: Sequence[str]) -> None:
        self.group, self.adapter, self.name = group, adapter, group.name
        self.shapes: Any = None  # the shapes planned for the steps this arm takes alone (plan())
        self.paths = {"cotrain": {"on": True, "why": "one base pass with " + ", ".join(partners)},
                      "fast_engine": {"on": group.packed, "why": group.why},
                      "compile": {"on": False, "why": "co-trained arms run the co-training step, uncompiled"}}

    def collate(self, examples: Sequence[Example]) -> Sequence[Example]:
        return examples

    @property
    def graphs(self) -> Any:
        """The group's CUDA graphs (train/graphs.py), once its packed step exists; else None."""
        return getattr(self.group.packed_step, "graphs", None)

    def plan(self, batches: Iterable[Sequence[Example]]) -> None:
        """This arm's steps alone to come (a cooldown probe's): their rows' shapes planned for these steps only.
        The group's plan also holds this arm's steps after its partners have ended, with as many shapes as those
        hundreds of steps are worth capturing; the probe's few steps would meet them all (bench/RESULTS.md: 5
        captures in its 88 steps), and the verdict waits for the probe. Its own plan captures what its steps are
        worth; the arm's later steps keep the group's shapes."""
        self.shapes = self.group.new_plan()
        self.group.plan(([(self.adapter, examples)] for examples in batches), self.shapes)

    def step(self, examples: Sequence[Example], lr: float) -> Any:
        outcome = self.group.step([(self.adapter, examples, lr)], self.shapes)[self.adapter]
        if isinstance(outcome, NonFiniteLoss):
            raise outcome
        return outcome


# ---------------------------------------------------------------- building the group


def check_group(profiles: Sequence[Profile]) -> None:
    """What one shared model needs (the launcher's placement groups only such arms; profiles may have changed)."""
    first = profiles[0]
    for p in profiles:
        same = (p.model.base, p.model.task, p.model.dtype, p.device, p.model.trust_remote_code)
        if same != (first.model.base, first.model.task, first.model.dtype, first.device, first.model.trust_remote_code):
            raise TrainFailure("NotCoTrainable", f"arms {first.name} and {p.name} differ in base model, task, dtype "
                               "or device and cannot share one", COTRAIN_HINT)
        if p.model.task != "generate" or p.model.init_adapter:
            raise TrainFailure("NotCoTrainable", f"arm {p.name}: co-training covers new adapters of causal LMs "
                               "(task generate, no init_adapter)", COTRAIN_HINT)


def build_group(arms: Sequence[ArmPaths], profiles: Sequence[Profile]) -> tuple[SharedModel, GroupEngine, list[Run]]:
    """Device, tokenizer, every arm's data, the base once with every adapter, each arm's optimizer: each arm's
    Run (as build_run makes it) over the shared model. The data is read or tokenised in a fork beside `model`,
    `lora` and `engine` (`data_wait`: how long they then waited for it). Every arm's startup_seconds hold the
    group's phases."""
    started = time.perf_counter()
    startup: dict[str, float | str] = {}

    def timed(phase: str, work: Callable[[], T]) -> T:
        begin = time.perf_counter()
        result = work()
        startup[phase] = round(time.perf_counter() - begin, 3)
        return result

    check_group(profiles)
    first = profiles[0]
    device, device_name = timed("device", lambda: pick_device(first))
    if device.type == "cpu":
        torch.set_num_threads(cpu_threads(first))
    seed_everything(first.train.seed)
    tokenizer = timed("tokenizer", lambda: load_tokenizer(first))
    pad_id = int(tokenizer.pad_token_id)  # read now: while the worker tokenises, only it touches the tokenizer

    def every_arms_data() -> list[tokcache.TrainingData]:  # arms on the same file: the first writes, the rest hit
        return [tokcache.load_training_data(p.data.train, tokenizer, base=p.model.base, task=p.model.task,
                                            max_length=p.train.max_length,
                                            trust_remote_code=p.model.trust_remote_code,
                                            folder=tokcache.cache_folder(arm.root.parent.parent))
                for arm, p in zip(arms, profiles)]

    model_dtype = resolve_dtype(first.model.dtype, device)
    # the data is read (or tokenised) in a fork while the model, the adapters and the engine are built
    began = time.perf_counter()
    pending = background.in_child(every_arms_data, "gputwin-data", send=tokcache.to_wire,
                                  receive=tokcache.from_wire)
    pending.add_done_callback(lambda _: startup.update(data=round(time.perf_counter() - began, 3)))
    base = timed("model", lambda: load_model(first, device, None))
    try:
        shared = timed("lora", lambda: SharedModel(base, [(p.lora, p.train.seed) for p in profiles]))
    except NotCoTrainable as exc:
        raise TrainFailure("NotCoTrainable", str(exc), COTRAIN_HINT) from None
    shared.model.to(device).train()
    engine = timed("engine", lambda: GroupEngine(shared, device=device, model_dtype=model_dtype, pad_id=pad_id,
                                                 fast=all(p.train.engine == "fast" for p in profiles)))
    data = timed("data_wait", pending.result)
    startup["total"] = round(time.perf_counter() - started, 3)
    runs = []
    for i, (arm, profile, training) in enumerate(zip(arms, profiles, data)):
        view = ArmView(shared, adapter_name(i))
        optimizer = build_optimizer(view, lr=profile.train.learning_rate, weight_decay=profile.train.weight_decay,
                                    device=device)
        engine.join(view, optimizer, profile.train.grad_clip)
        partners = [p.name for p in profiles if p.name != profile.name]
        per_epoch, total = steps_for(len(training.examples), profile.train.batch_size, profile.train.epochs)
        root = Path(profile.train.output_dir) if profile.train.output_dir else arm.checkpoints
        runs.append(Run(arm=arm, profile=profile, device=device, device_name=device_name, model_dtype=model_dtype,
                        tokenizer=tokenizer, model=view, optimizer=optimizer,
                        engine=ArmEngine(engine, view.adapter, partners), examples=training.examples,
                        label_names=training.label_names, steps_per_epoch=per_epoch, total_steps=total,
                        milestone_step=milestone_step(profile, per_epoch), checkpoint_root=root,
                        bad_lines=training.bad_lines, startup={**startup, "data_cache": training.cache}))
    return shared, engine, runs


# ---------------------------------------------------------------- the group's loop


class CoTrainer(Trainer):
    """One arm of a group: the Trainer of that arm, validated with only its adapter active."""

    def __init__(self, run: Run, writer: EventWriter, stop: StopSignal, imports_seconds: float | None,
                 shared: SharedModel, partners: Sequence[str]) -> None:
        super().__init__(run, writer, stop, imports_seconds)
        self.shared, self.partners = shared, list(partners)
        self.adapter = run.model.adapter
        self.replan: Callable[[], None] | None = None  # the group's plan_shapes, once the group trains
        self.defer_probes = True  # the group validates every arm at its milestone first, then runs their probes
        self.started_extra = {"shares_process_with": self.partners}

    @contextmanager
    def scoring_model(self) -> Iterator[Any]:
        with self.shared.only(self.adapter) as model:
            yield model

    def plan_shapes(self) -> None:
        """The group plans the rows of its arms' steps together (Group.plan_shapes): at its start, and again
        when this arm's steps change (an extension)."""
        if self.replan is not None:
            self.replan()


class Group:
    """The arms of one process, stepped together until every one has ended."""

    def __init__(self, trainers: Sequence[CoTrainer], engine: GroupEngine) -> None:
        self.live, self.engine = list(trainers), engine
        self.codes: dict[str, int] = {}

    def train(self) -> int:
        for trainer in list(self.live):
            self.arm(trainer, trainer.begin)
        self.plan_shapes()
        for trainer in self.live:
            trainer.replan = self.plan_shapes
        self.probes()
        while self.live:
            # -- between steps: each arm's requests and signals; an arm that has ended is given back
            for trainer in list(self.live):
                ended = self.arm(trainer, trainer.between_steps)
                if ended is not None:
                    self.end(trainer, ended)
            # -- one step of every live arm: one pass of the base, each adapter on its own rows
            work = [(t, b) for t in list(self.live) if (b := self.arm(t, t.next_batch)) is not None]
            if not work:
                continue
            try:
                outcomes = self.engine.step([(t.adapter, b.examples, b.lr) for t, b in work])
            except Exception as exc:  # the shared step itself (out of memory, ...): every arm in it fails
                return self.fail_all([t for t, _ in work], exc)
            with keeping_decoders():  # the arms' milestone validations and their probes' share one decoder
                for trainer, batch in work:
                    self.arm(trainer, lambda t=trainer, b=batch: self.advance(t, b, outcomes[t.adapter]))
                self.probes()
        return max(self.codes.values(), default=0)

    def probes(self) -> None:
        """The cooldown probes due, once every arm at its milestone has been validated: no arm's validation
        waits for another arm's probe."""
        for trainer in list(self.live):
            if trainer.probe_due:
                self.arm(trainer, trainer.run_due_probe)

    def plan_shapes(self) -> None:
        """The steps to come, as the arms will step them together while each has steps left."""
        ahead = [zip(itertools.repeat(t.adapter), t.upcoming()) for t in self.live]
        self.engine.plan([arm for arm in step if arm is not None] for step in itertools.zip_longest(*ahead))

    @staticmethod
    def advance(trainer: CoTrainer, batch: Batch, outcome: Any) -> None:
        if isinstance(outcome, NonFiniteLoss):
            raise NonFiniteLoss(f"{outcome} at step {batch.step}")
        trainer.advance(batch, outcome)

    def arm(self, trainer: CoTrainer, work: Any) -> Any:
        """One arm's part of the loop; a failure there ends that arm alone (its failed event, its exit)."""
        try:
            return work()
        except Exception as exc:
            known = known_failure(exc, trainer.run.arm)
            if known is None:
                traceback.print_exc()
                known = (type(exc).__name__, str(exc), INTERNAL_HINT, 1)
            report_failure(trainer.writer, trainer, trainer.run.arm, *known[:3])
            self.end(trainer, known[3])
            return None

    def end(self, trainer: CoTrainer, code: int) -> None:
        """Give the arm back (its exit recorded), unless an extend request came for it as it ended: then it
        starts a new life here, resuming from the checkpoint it has just written, as its supervisor would."""
        if trainer not in self.live:
            return
        index = self.live.index(trainer)
        try:
            released = release_arm(trainer.run.arm, code)
        except OSError as exc:  # (a full disk): it has ended all the same; the process's end records it
            print(f"gputwin: {trainer.run.arm.name}: cannot record its exit now ({exc}); its supervisor records it "
                  "when this process ends", file=sys.stderr, flush=True)
            released = True
        if released:
            del self.live[index]
            self.codes[trainer.run.profile.name] = code
            return
        print(f"gputwin: {trainer.run.arm.name}: an extend request arrived as it ended; training it on",
              file=sys.stderr, flush=True)
        again = CoTrainer(trainer.run, trainer.writer, trainer.stop, None, trainer.shared, trainer.partners)
        again.replan = self.plan_shapes  # its new steps' rows, planned once it has resumed
        self.live[index] = again
        self.arm(again, again.begin)
        if again in self.live and again.probe_due:
            self.arm(again, again.run_due_probe)

    def fail_all(self, trainers: Sequence[CoTrainer], exc: Exception) -> int:
        """Every arm of the failed step gets the failed event; the exits are the process's (its supervisor)."""
        known = known_failure(exc, trainers[0].run.arm)
        error, message, hint = known[:3] if known else (type(exc).__name__, str(exc), INTERNAL_HINT)
        for trainer in trainers:
            report_failure(trainer.writer, trainer, trainer.run.arm, error, message, hint)
        if known is None:
            raise exc
        return known[3]


def train_group(arm_dirs: Sequence[str | Path], *, imports_seconds: float | None = None) -> int:
    """Co-train the arms in `arm_dirs` to their ends; the exit code of `python -m gputwin.train --group`."""
    arms = [ArmPaths(Path(d).resolve()) for d in arm_dirs]
    stop = StopSignal()
    with ExitStack() as stack:
        writers = [stack.enter_context(EventWriter(arm.events, fold=True)) for arm in arms]
        stack.enter_context(stop.installed())
        try:
            profiles = [read_profile(arm) for arm in arms]
            shared, engine, runs = build_group(arms, profiles)
        except Exception as exc:  # nothing trained yet: every arm fails the same way
            known = known_failure(exc, arms[0])
            error, message, hint = known[:3] if known else (type(exc).__name__, str(exc), INTERNAL_HINT)
            for arm, writer in zip(arms, writers):
                report_failure(writer, None, arm, error, message, hint)
            if known is None:
                raise
            return known[3]
        names = [p.name for p in profiles]
        trainers = [CoTrainer(run, writer, stop, imports_seconds, shared, [n for n in names if n != run.profile.name])
                    for run, writer in zip(runs, writers)]
        return Group(trainers, engine).train()
