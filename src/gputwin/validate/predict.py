"""Predicted entities for a list of samples, from either head: the one place model inference happens.

generate: batched greedy decoding, prompts sorted by length and left-padded, each row stopping as soon as its
JSON list is closed (or at eos). Two decoders give the same greedy tokens: "fast" (gputwin.validate.fastgen: packed
prefill, static KV cache, CUDA-graph decode; the default where the model's architecture allows it) and
"plain" (transformers' generate). tag: one forward pass per batch and an argmax.
torch/transformers are imported inside the functions: importing this module costs nothing.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
import time
import weakref
from typing import Any, Callable, Iterator, Sequence, TypeVar

from ..core.data import Entity, Sample
from ..core.encoding import (answer_closed, answer_text, decode_tag, encode_prompts, encode_tag_many, eos_id,
                             parse_answer)

DEFAULT_BATCH = {("generate", "cuda"): 64, ("generate", "cpu"): 8, ("tag", "cuda"): 128, ("tag", "cpu"): 32}
T = TypeVar("T")
UNPARSABLE_KEPT = 5  # raw outputs kept in info for a look at what went wrong


def default_batch_size(task: str, device: Any) -> int:
    kind = "cuda" if str(device).startswith("cuda") else "cpu"
    return DEFAULT_BATCH[(task, kind)]


def model_device(model: Any) -> Any:
    return next(model.parameters()).device


def default_max_new_tokens(samples: Sequence[Sample], tokenizer: Any) -> int:
    """Room for the longest gold answer in the sample, plus a margin for a model that writes a bit more."""
    longest = max((len(tokenizer(answer_text(s.entities), add_special_tokens=False)["input_ids"]) for s in samples),
                  default=1)
    return longest + max(16, longest // 4) + 1  # + 1 for eos


def predict(model: Any, tokenizer: Any, samples: Sequence[Sample], *, task: str,
            label_names: Sequence[str] | None = None, device: Any = None, batch_size: int = 0,
            max_length: int = 512, max_new_tokens: int | None = None,
            decoder: str = "fast") -> tuple[list[list[Entity]], dict]:
    """Entities the model finds in each sample (in sample order) and how it went: unparsable outputs,
    seconds, batches. The model's train/eval mode is restored afterwards (the trainer passes its live model)."""
    import torch

    device = model_device(model) if device in (None, "auto") else device
    chosen_batch = batch_size if batch_size and batch_size > 0 else None
    batch_size = chosen_batch or default_batch_size(task, device)
    was_training = model.training
    model.eval()
    started = time.perf_counter()
    try:
        with _TOKENIZER_USE, torch.inference_mode():
            if task == "generate":
                fast = decoder == "fast" and _fast_decoder_fits(model)
                run = _predict_generate_fast if fast else _predict_generate
                preds, info = run(model, tokenizer, samples, device=device,
                                  batch_size=chosen_batch if fast else batch_size,
                                  max_length=max_length, max_new_tokens=max_new_tokens)
                info["decoder"] = "fast" if fast else "plain"
            elif task == "tag":
                preds, info = _predict_tag(model, tokenizer, samples, label_names=label_names, device=device,
                                           batch_size=batch_size, max_length=max_length)
            else:
                raise ValueError(f"unknown task {task!r}")
    finally:
        model.train(was_training)
    info.setdefault("batch_size", batch_size)
    info.update(seconds=round(time.perf_counter() - started, 3), n=len(samples))
    return preds, info


def _batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Sample positions grouped by similar length (longest first, so memory trouble shows at once)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


# ---------------------------------------------------------------- generate


# What a validation works out from the tokenizer and the samples alone, kept per tokenizer for the life of the
# process: a trainer validates the same samples at every milestone, for every co-trained arm and for the
# cooldown probe (a sweep of the vocabulary and two tokenizations of 500 texts each time otherwise).
_PER_TOKENIZER: weakref.WeakKeyDictionary[Any, dict[Any, Any]] = weakref.WeakKeyDictionary()


def _remembered(tokenizer: Any, key: Any, make: Callable[[], T]) -> T:
    try:
        known = _PER_TOKENIZER.setdefault(tokenizer, {})
    except TypeError:  # not weakly referenceable: work it out each time
        return make()
    if key not in known:
        known[key] = make()
    return known[key]


# A fast tokenizer is not to be used from two threads at once: prepare() on a trainer's thread and predict()
# take turns (a validation that meets a preparation still running waits for it, then finds its work done).
_TOKENIZER_USE = threading.RLock()


def prepare(tokenizer: Any, samples: Sequence[Sample], *, task: str, max_length: int) -> None:
    """Work out now what predicting these samples needs of the tokenizer alone (the encoded prompts, the room
    for answers, the ids that can close one), remembered for predict(): a trainer does this on a thread while it
    trains, so that its milestone's validation starts with them ready (0.16 s of the seed's first validation
    on an H100, more with a 151k-token vocabulary)."""
    if task != "generate":
        return
    with _TOKENIZER_USE:
        _prompts_and_room(samples, tokenizer, max_length, None)
        _closing_token_ids(tokenizer)


def _closing_token_ids(tokenizer: Any) -> set[int]:
    """Ids whose token text holds a "]": only after one of these can the answer's list have closed."""
    def sweep() -> set[int]:
        tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        return {i for i, tok in enumerate(tokens) if tok and "]" in tok}

    return _remembered(tokenizer, ("closing", len(tokenizer)), sweep)


def _prompts_and_room(samples: Sequence[Sample], tokenizer: Any, max_length: int,
                      max_new_tokens: int | None) -> tuple[list[tuple[list[int], bool]], int]:
    """The encoded prompts (ids, truncated) and the new tokens to allow, remembered for the same texts."""
    texts = tuple(s.text for s in samples)
    encoded = _remembered(tokenizer, ("prompts", max_length, texts),
                          lambda: encode_prompts(list(texts), tokenizer, max_length))
    room = max_new_tokens or _remembered(tokenizer, ("room", texts, tuple(tuple(s.entities) for s in samples)),
                                         lambda: default_max_new_tokens(samples, tokenizer))
    return encoded, room


def _json_closed_criterion(tokenizer: Any, prompt_length: int) -> Any:
    """A StoppingCriteria marking each row done once its generated text holds a complete JSON list."""
    import torch
    from transformers import StoppingCriteria

    closing = _closing_token_ids(tokenizer)

    class JsonListClosed(StoppingCriteria):
        def __init__(self) -> None:
            self.done: list[bool] = []

        def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
            if not self.done:
                self.done = [False] * input_ids.shape[0]
            for row, token in enumerate(input_ids[:, -1].tolist()):  # one device sync a step
                if token in closing and not self.done[row]:
                    text = tokenizer.decode(input_ids[row, prompt_length:].tolist(), skip_special_tokens=True)
                    self.done[row] = answer_closed(text)
            return torch.tensor(self.done, dtype=torch.bool, device=input_ids.device)

    return JsonListClosed()


def _generation_config(tokenizer: Any, max_new_tokens: int) -> Any:
    """Plain greedy decoding, whatever sampling defaults the model ships with.

    generate() fills every field left None from the model's own generation_config (Qwen3 ships sampling
    settings), so the sampling fields are set to their neutral values instead."""
    from transformers import GenerationConfig

    eos = eos_id(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, use_cache=True,
                            temperature=1.0, top_p=1.0, top_k=50,
                            eos_token_id=eos, pad_token_id=pad)


def _predict_generate(model: Any, tokenizer: Any, samples: Sequence[Sample], *, device: Any, batch_size: int,
                      max_length: int, max_new_tokens: int | None) -> tuple[list[list[Entity]], dict]:
    import torch
    from transformers import StoppingCriteriaList

    encoded, max_new_tokens = _prompts_and_room(samples, tokenizer, max_length, max_new_tokens)
    prompts = [ids for ids, _ in encoded]
    config = _generation_config(tokenizer, max_new_tokens)
    outputs: list[str] = [""] * len(samples)
    generated_tokens = 0
    batches = _batches([len(p) for p in prompts], batch_size)
    for batch in batches:
        width = max(len(prompts[i]) for i in batch)
        ids = torch.full((len(batch), width), config.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):  # left padding: every prompt ends where generation starts
            ids[row, width - len(prompts[i]):] = torch.tensor(prompts[i])
            mask[row, width - len(prompts[i]):] = 1
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config,
                             stopping_criteria=StoppingCriteriaList([_json_closed_criterion(tokenizer, width)]))
        new = out[:, width:].cpu()
        for row, i in enumerate(batch):
            outputs[i] = tokenizer.decode(new[row], skip_special_tokens=True)
        generated_tokens += int((new != config.pad_token_id).sum())
    return _parsed(outputs, batches=len(batches), max_new_tokens=max_new_tokens, generated_tokens=generated_tokens,
                   truncated=sum(1 for _, cut in encoded if cut))


def _fast_decoder_fits(model: Any) -> bool:
    """The fast decoder runs decoder-only models whose layers it knows (Llama/Qwen-style); others use generate."""
    from ..kernels.decoder import decoder_parts

    try:
        decoder_parts(model)
    except TypeError:
        return False
    return True


_KEPT: contextvars.ContextVar[Any] = contextvars.ContextVar("gputwin_kept_decoder", default=None)


@contextlib.contextmanager
def keeping_decoders() -> Iterator[None]:
    """Validations that follow one another here (an arm's milestone and its cooldown probe, the arms of a group)
    share one decoder (fastgen.Kept): its cache and captured decode step are made by the first and used again by
    the next of the same batch shapes, for a model whose every adapter is merged. What it holds is freed when the
    block ends."""
    if _KEPT.get() is not None:
        yield
        return
    from .fastgen import Kept

    token = _KEPT.set(Kept())
    try:
        yield
    finally:
        _KEPT.reset(token)


def _predict_generate_fast(model: Any, tokenizer: Any, samples: Sequence[Sample], *, device: Any,
                           batch_size: int | None, max_length: int,
                           max_new_tokens: int | None) -> tuple[list[list[Entity]], dict]:
    from .fastgen import greedy_generate
    from .merge import lora_layer_count, merged_adapter

    started = time.perf_counter()
    encoded, max_new_tokens = _prompts_and_room(samples, tokenizer, max_length, max_new_tokens)
    eos = eos_id(tokenizer)
    closing = _closing_token_ids(tokenizer)

    def closed(ids: list[int]) -> bool:  # decode only after a token that can close the list
        return bool(ids) and ids[-1] in closing and answer_closed(tokenizer.decode(ids, skip_special_tokens=True))

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    phases = {"prompts_s": time.perf_counter() - started}
    kept = _KEPT.get()
    # one GEMM per adapted layer while decoding; the weights come back unchanged
    with merged_adapter(model, into=kept.merged if kept is not None else None) as merged:
        phases["merge_s"] = time.perf_counter() - started - phases["prompts_s"]
        # a kept decoder's graph runs the layers as they were: only where every adapter layer is merged (the
        # graph then reads base weights and merged ones, the same tensors each time)
        keep = kept if kept is not None and merged == lora_layer_count(model) else None
        generated = greedy_generate(model, [ids for ids, _ in encoded], max_new_tokens=max_new_tokens,
                                    eos_ids=[eos], pad_id=pad, stop=closed, batch_size=batch_size, stats=phases,
                                    keep=keep)
    parsing = time.perf_counter()
    outputs = [tokenizer.decode(ids, skip_special_tokens=True) for ids in generated]
    batches, rows = int(phases.pop("batches", 1)), int(phases.pop("batch_rows", batch_size or len(samples)))
    preds, info = _parsed(outputs, batches=batches, max_new_tokens=max_new_tokens,
                          generated_tokens=sum(len(g) for g in generated),
                          truncated=sum(1 for _, cut in encoded if cut), batch_size=rows)
    phases["answers_s"] = time.perf_counter() - parsing
    info["phases"] = {name: round(seconds, 3) for name, seconds in phases.items()}
    if keep is not None and keep.missed:  # why the kept decoder did not serve (what differed)
        info["decoder_missed"] = list(keep.missed)
    return preds, info


def _parsed(outputs: list[str], **info: Any) -> tuple[list[list[Entity]], dict]:
    """Entities from each raw answer, and the unparsable ones counted (a few kept to look at)."""
    preds, unparsable = [], []
    for i, text in enumerate(outputs):
        entities, ok = parse_answer(text)
        preds.append(entities)
        if not ok:
            unparsable.append(i)
    info.update(unparsable=len(unparsable),
                unparsable_outputs=[{"position": i, "output": outputs[i]} for i in unparsable[:UNPARSABLE_KEPT]],
                outputs=outputs)
    return preds, info


# ---------------------------------------------------------------- tag


def _label_names(model: Any, label_names: Sequence[str] | None) -> list[str]:
    if label_names:
        return list(label_names)
    id2label = getattr(model.config, "id2label", None) or {}
    return [id2label[i] for i in sorted(id2label)]


def _predict_tag(model: Any, tokenizer: Any, samples: Sequence[Sample], *, label_names: Sequence[str] | None,
                 device: Any, batch_size: int, max_length: int) -> tuple[list[list[Entity]], dict]:
    import torch

    names = _label_names(model, label_names)
    label2id = {name: i for i, name in enumerate(names)}
    encoded = encode_tag_many([(s.text, ()) for s in samples], tokenizer, label2id, max_length)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    preds: list[list[Entity]] = [[] for _ in samples]
    batches = _batches([len(e["input_ids"]) for e in encoded], batch_size)
    for batch in batches:
        width = max(len(encoded[i]["input_ids"]) for i in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            n = len(encoded[i]["input_ids"])
            ids[row, :n] = torch.tensor(encoded[i]["input_ids"])
            mask[row, :n] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        best = logits.argmax(-1).cpu().tolist()
        for row, i in enumerate(batch):
            n = len(encoded[i]["input_ids"])
            preds[i] = decode_tag(samples[i].text, encoded[i]["offsets"], best[row][:n], names)
    info = {"unparsable": 0, "unparsable_outputs": [], "batches": len(batches),
            "truncated": sum(1 for e in encoded if e["truncated"])}
    return preds, info
