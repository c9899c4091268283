"""Everything the loop needs before its first step: device, threads, data, model, optimizer, engine.

Kept apart from the loop so the loop reads as the training story and a faster engine can reuse the
same setup. Training data found in the tokenised-data cache comes with the tokenizer's special ids, so such a
run starts without its tokenizer (DeferredTokenizer: loaded on a thread once training runs, for validation,
with the validation's own tokenizer work: Run.prepare_validation).
Otherwise the tokenizer loads first and the data is read and tokenised in a fork of the trainer while the model
loads (gputwin.train.background.in_child: the two share no GIL): they need nothing from each other, except the tag
head, whose size comes from the data's labels, so a tag run waits for the data before it loads its model.
"""

from __future__ import annotations

import dataclasses
import os
import random
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch

from ..validate import modeling
from ..core.paths import ArmPaths
from ..core.plan import milestone_step, steps_for
from ..core.profiles import Profile
from . import background, compiling, tokcache
from .batching import Example
from .engine import Engine, build_optimizer, make_engine

T = TypeVar("T")


class TrainFailure(Exception):
    """A failure the trainer reports as a `failed` event with a hint, without a traceback."""

    def __init__(self, error: str, message: str, hint: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.error, self.message, self.hint, self.exit_code = error, message, hint, exit_code


@dataclass
class Run:
    """The built run: what the loop works with, fixed for the life of the process."""

    arm: ArmPaths
    profile: Profile
    device: torch.device
    device_name: str
    model_dtype: torch.dtype
    tokenizer: Any  # the tokenizer, or a DeferredTokenizer: read it through tokenizer_now()
    model: Any
    optimizer: torch.optim.Optimizer
    engine: Engine
    examples: list[Example]
    label_names: list[str] | None
    steps_per_epoch: int
    total_steps: int  # as planned by the profile (extensions live in the lr plan)
    milestone_step: int
    checkpoint_root: Path
    bad_lines: int
    startup: dict[str, float | str]  # seconds of build_run's phases and in total; data_cache: how data was got
    preparing: threading.Thread | None = None  # prepare_validation's thread, once started

    def tokenizer_now(self) -> Any:
        """The tokenizer, waiting for a deferred one to finish loading (validation needs it; training never)."""
        return self.tokenizer.get() if isinstance(self.tokenizer, DeferredTokenizer) else self.tokenizer

    def prepare_validation(self) -> None:
        """Once training runs (the loop calls this after each step's event; it acts once): on a daemon thread, load
        a tokenizer left out of the start-up, then work out what the milestone's validation needs of it (its
        prompts, gputwin.validate.predict.prepare). Anything that fails here is left for the validation itself to
        meet and report."""
        if self.preparing is not None:
            return
        profile = self.profile

        def work() -> None:
            from ..validate import predict
            from ..validate.run import validation_samples

            try:
                tokenizer = self.tokenizer_now()
                _, samples = validation_samples(profile.data.test, profile.milestone.sample_size,
                                                profile.milestone.sample_seed)
                predict.prepare(tokenizer, samples, task=profile.model.task, max_length=profile.train.max_length)
            except Exception:  # noqa: BLE001 - the validation meets the same failure and reports it
                pass

        self.preparing = threading.Thread(target=work, name="gputwin-validation-prep", daemon=True)
        self.preparing.start()

    @property
    def adapter_meta(self) -> dict[str, Any]:
        """gputwin.json of every adapter this run saves."""
        p = self.profile
        return {"task": p.model.task, "base": p.model.base, "label_names": self.label_names,
                "max_length": p.train.max_length, "trust_remote_code": p.model.trust_remote_code, "arm": p.name}

    @property
    def fingerprint(self) -> dict[str, Any]:
        """What must match for a checkpoint to be resumed by this run."""
        p = self.profile
        return {"base": p.model.base, "task": p.model.task, "lora": [p.lora.r, p.lora.alpha, list(p.lora.target_modules)],
                "label_names": self.label_names, "batch_size": p.train.batch_size, "samples": len(self.examples),
                "seed": p.train.seed}

    @property
    def tokens_per_epoch(self) -> int:
        return sum(e.n_tokens for e in self.examples)

    @property
    def truncated(self) -> int:
        return sum(e.truncated for e in self.examples)


def pick_device(profile: Profile) -> tuple[torch.device, str]:
    """cuda:0 when the launcher narrowed CUDA_VISIBLE_DEVICES to the arm's GPU, else cuda:<index>; or CPU."""
    if profile.device is None:
        return torch.device("cpu"), "cpu"
    if not torch.cuda.is_available():
        raise TrainFailure("CudaUnavailable", f"{profile.source or profile.name}: device: the profile asks for GPU "
                           f"{profile.device} but CUDA is not available to this process (torch {torch.__version__}, "
                           f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')!r})",
                           "set device = \"cpu\" in the profile, or check the GPU driver and that torch is a CUDA build")
    index = 0 if os.environ.get("CUDA_VISIBLE_DEVICES") else profile.device
    device = torch.device(f"cuda:{index}")
    torch.cuda.set_device(device)
    return device, f"{device} {torch.cuda.get_device_name(device)}"


def cpu_threads(profile: Profile) -> int:
    """train.threads, else the launcher's fair share ($GPUTWIN_THREADS), else 1."""
    if profile.train.threads:
        return profile.train.threads
    try:
        return max(1, int(os.environ.get("GPUTWIN_THREADS", "1")))
    except ValueError:
        return 1


def load_model(profile: Profile, device: torch.device, label_names: list[str] | None) -> Any:
    """The profile's base model on its device, in its dtype (no adapter yet)."""
    spec = profile.model
    return modeling.load_base(spec.base, task=spec.task, dtype=modeling.resolve_dtype(spec.dtype, device),
                              device=device, label_names=label_names, trust_remote_code=spec.trust_remote_code)


def quiet_transformers() -> None:
    """No download/loading progress bars in stderr.log: the event log is the progress report."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def load_tokenizer(profile: Profile) -> Any:
    """transformers imported (quietened) and the profile's tokenizer loaded: the `tokenizer` phase."""
    quiet_transformers()
    return modeling.load_tokenizer(profile.model.base, profile.model.trust_remote_code)


class DeferredTokenizer:
    """A tokenizer that training does not need: loaded by the first get(), in the thread that calls it (the run's
    validation preparation, once training runs: Run.prepare_validation); a get() meanwhile waits for that load.

    get() returns the tokenizer, or raises what loading it raised (a ModelLoadError says why, as at start-up)."""

    def __init__(self, load: Callable[[], Any]) -> None:
        self._load = load
        self._lock = threading.Lock()
        self._future: Future[Any] | None = None

    def get(self) -> Any:
        with self._lock:
            first, self._future = self._future is None, self._future or Future()
        if first:
            try:
                self._future.set_result(self._load())
            except BaseException as exc:  # handed to every get(), in the threads that need the tokenizer
                self._future.set_exception(exc)
        return self._future.result()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def compile_decision(profile: Profile, device: torch.device, device_name: str, model: Any,
                     training: tokcache.TrainingData | None, *, logs_root: Path) -> compiling.Decision:
    """train.compile for this run (gputwin.train.compiling); training: the data, which "auto" needs."""
    mode, on_gpu = profile.train.compile, device.type == "cuda"
    if mode == "off" or not on_gpu or profile.train.engine != "fast":
        return compiling.decide(mode, on_gpu=on_gpu, engine=profile.train.engine, steps=0, tokens_per_step=0,
                                recorded_s=None)
    cache = compiling.use_cache(logs_root)
    key = compiling.layer_key(model.config.to_dict(), dataclasses.asdict(profile.lora), profile.model.dtype, device_name,
                              torch.__version__)
    steps, tokens = 0, 0.0
    if training is not None and training.examples:
        _, steps = steps_for(len(training.examples), profile.train.batch_size, profile.train.epochs)
        tokens = profile.train.batch_size * sum(e.n_tokens for e in training.examples) / len(training.examples)
    decision = compiling.decide(mode, on_gpu=on_gpu, engine=profile.train.engine, steps=steps,
                                tokens_per_step=tokens, recorded_s=compiling.recorded_seconds(cache, key))
    return dataclasses.replace(decision, cache=cache, key=key)


def build_run(arm: ArmPaths, profile: Profile) -> Run:
    """Device, the data from the cache or the tokenizer and the data beside the model; then LoRA, optimizer and
    engine (each phase timed).

    startup: seconds of each phase. `data` begins with a look in the cache; `transformers` is its first import.
    With the data in the cache, that look is all of `data` and the tokenizer is left for later (`tokenizer` 0,
    `tokenizer_load` "deferred"); otherwise `tokenizer` is its load, the rest of `data` runs in a fork beside
    `model`, `lora` and `engine`, and `data_wait` is how long they then waited for it (`tokenizer_load`
    "startup"). `total` is the wall time of it all; `data_cache` says whether the tokenised data came from the
    cache (tokcache's HIT, WRITTEN, REBUILT, UNSAVED or OFF).
    """
    started = time.perf_counter()
    startup: dict[str, float | str] = {}

    def add(phase: str, seconds: float) -> None:
        startup[phase] = round(float(startup.get(phase, 0.0)) + seconds, 3)

    def timed(phase: str, work: Callable[[], T]) -> T:
        begin = time.perf_counter()
        result = work()
        add(phase, time.perf_counter() - begin)
        return result

    device, device_name = timed("device", lambda: pick_device(profile))
    if device.type == "cpu":
        torch.set_num_threads(cpu_threads(profile))
    seed_everything(profile.train.seed)
    spec = profile.model
    logs_root = arm.root.parent.parent
    folder = tokcache.cache_folder(logs_root)
    cached = timed("data", lambda: tokcache.lookup(profile.data.train, base=spec.base, task=spec.task,
                                                   max_length=profile.train.max_length,
                                                   trust_remote_code=spec.trust_remote_code, folder=folder))
    timed("transformers", quiet_transformers)  # its first import: the model needs it in any case
    if cached is not None and cached.tokenizer is not None:
        # everything training needs of the tokenizer came with the data: it loads once training runs
        tokenizer: Any = DeferredTokenizer(lambda: load_tokenizer(profile))
        pad_id = cached.tokenizer.pad_token_id
        startup.update(tokenizer=0.0, tokenizer_load="deferred")
    else:
        cached = None  # (an entry without the tokenizer's ids: the tokenizer loads now, as without a cache)
        tokenizer = timed("tokenizer", lambda: load_tokenizer(profile))
        pad_id = int(tokenizer.pad_token_id)  # read now: while the worker tokenises, only it touches the tokenizer
        startup["tokenizer_load"] = "startup"

    def data() -> tokcache.TrainingData:
        return tokcache.load_training_data(
            profile.data.train, tokenizer, base=spec.base, task=spec.task, max_length=profile.train.max_length,
            trust_remote_code=spec.trust_remote_code, folder=folder)

    pending: Future[tokcache.TrainingData] = Future()
    if cached is None:  # read or tokenised in a fork, beside the model's load (a failed start waits for nothing)
        began = time.perf_counter()
        pending = background.in_child(data, "gputwin-data", send=lambda one: tokcache.to_wire([one]),
                                      receive=lambda raw: tokcache.from_wire(raw)[0])
        pending.add_done_callback(lambda _: add("data", time.perf_counter() - began))
    else:
        pending.set_result(cached)
    label_names = None
    if spec.task == "tag":  # the head's size is the data's label count
        label_names = timed("data_wait", pending.result).label_names
    base = timed("model", lambda: load_model(profile, device, label_names))
    model_dtype = modeling.resolve_dtype(spec.dtype, device)
    model = timed("lora", lambda: modeling.attach_lora(base, profile.lora, spec.task, spec.init_adapter).to(device))
    model.train()

    # train.compile = "auto" weighs the run's length, which the data gives: a GPU arm's engine waits for it
    wants_length = profile.train.compile == "auto" and device.type == "cuda" and profile.train.engine == "fast"
    training = timed("data_wait", pending.result) if wants_length else None
    compile = compile_decision(profile, device, device_name, model, training, logs_root=logs_root)

    def optimizer_and_engine() -> tuple[torch.optim.Optimizer, Engine]:
        optimizer = build_optimizer(model, lr=profile.train.learning_rate, weight_decay=profile.train.weight_decay,
                                    device=device)
        return optimizer, make_engine(profile.train.engine, model, optimizer, device=device,
                                      model_dtype=model_dtype, grad_clip=profile.train.grad_clip,
                                      pad_id=pad_id, compile=compile.on)

    optimizer, engine = timed("engine", optimizer_and_engine)
    compiling.follow(engine, compile)
    if training is None:
        training = timed("data_wait", pending.result)
    startup["data_cache"] = training.cache
    startup["total"] = round(time.perf_counter() - started, 3)
    examples = training.examples
    per_epoch, total = steps_for(len(examples), profile.train.batch_size, profile.train.epochs)
    root = Path(profile.train.output_dir) if profile.train.output_dir else arm.checkpoints
    return Run(arm=arm, profile=profile, device=device, device_name=device_name, model_dtype=model_dtype,
               tokenizer=tokenizer, model=model, optimizer=optimizer, engine=engine, examples=examples,
               label_names=training.label_names, steps_per_epoch=per_epoch, total_steps=total,
               milestone_step=milestone_step(profile, per_epoch), checkpoint_root=root,
               bad_lines=training.bad_lines, startup=startup)
