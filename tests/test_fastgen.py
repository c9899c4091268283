"""greedy_generate gives what transformers' generate gives (tiny Qwen3 + LoRA on CPU, fp32)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM, StoppingCriteria, StoppingCriteriaList

from gputwin.validate.fastgen import greedy_generate

REPO = Path(__file__).resolve().parents[1]
VOCAB, PAD = 64, 0


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256)
    peft_model = get_peft_model(Qwen3ForCausalLM(config), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                                     target_modules=["q_proj", "k_proj", "v_proj",
                                                                                     "o_proj"]))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.2)
    return peft_model.eval()


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    generator = torch.Generator().manual_seed(1)
    lengths = [3, 17, 9, 25, 1, 12, 30, 6, 17]  # mixed, with ties and a one-token prompt
    return [torch.randint(1, VOCAB, (n,), generator=generator).tolist() for n in lengths]


class PerRowStop(StoppingCriteria):
    """transformers' per-row form of a stop(generated_ids) predicate."""

    def __init__(self, stop: Callable[[list[int]], bool], width: int) -> None:
        self.stop, self.width = stop, width

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: object) -> torch.Tensor:
        return torch.tensor([self.stop(row[self.width:]) for row in input_ids.tolist()])


def hf_greedy(model: torch.nn.Module, prompts: list[list[int]], new_tokens: int, eos: list[int] | None = None,
              stop: Callable[[list[int]], bool] | None = None) -> list[list[int]]:
    """model.generate on one left-padded batch, each row cut after its eos or stop point (pads follow there)."""
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), PAD)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):], mask[row, width - len(p):] = torch.tensor(p), 1
    config = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=PAD)
    criteria = StoppingCriteriaList([PerRowStop(stop, width)]) if stop else None
    out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config, stopping_criteria=criteria)
    results = []
    for row in out[:, width:].tolist():
        n = next((k + 1 for k in range(len(row)) if (eos and row[k] in eos) or (stop and stop(row[:k + 1]))),
                 len(row))
        results.append(row[:n])
    return results


def test_same_tokens_as_generate_with_left_padding_and_mixed_lengths(model, prompts) -> None:
    reference = hf_greedy(model, prompts, 12)
    assert greedy_generate(model, prompts, max_new_tokens=12, pad_id=PAD) == reference
    assert len({tuple(r) for r in reference}) > 3  # the rows really differ: the check can fail


def test_eos_ends_rows_early_like_generate(model, prompts) -> None:
    unconstrained = hf_greedy(model, prompts, 12)
    eos = unconstrained[1][4]  # a token some row writes mid-way
    reference = hf_greedy(model, prompts, 12, eos=[eos])
    got = greedy_generate(model, prompts, max_new_tokens=12, eos_ids=[eos], pad_id=PAD, check_every=3)
    assert got == reference
    assert any(len(r) < 12 and r[-1] == eos for r in got)


def test_stop_callback_acts_like_a_per_row_stopping_criterion(model, prompts) -> None:
    unconstrained = hf_greedy(model, prompts, 12)
    marker = unconstrained[3][5]

    def stop(ids: list[int]) -> bool:  # not monotone on purpose: it looks at the last token only
        return ids[-1] == marker

    reference = hf_greedy(model, prompts, 12, stop=stop)
    got = greedy_generate(model, prompts, max_new_tokens=12, pad_id=PAD, stop=stop, check_every=4)
    assert got == reference
    assert any(len(r) < 12 for r in got)


def test_batches_and_prefill_chunks_do_not_change_the_result(model, prompts) -> None:
    whole = greedy_generate(model, prompts, max_new_tokens=8, pad_id=PAD)
    split = greedy_generate(model, prompts, max_new_tokens=8, pad_id=PAD, batch_size=4, prefill_tokens=20)
    assert split == whole


def test_training_mode_is_restored_and_empty_input_is_fine(model, prompts) -> None:
    model.train()
    try:
        greedy_generate(model, prompts[:2], max_new_tokens=2)
        assert model.training
    finally:
        model.eval()
    assert greedy_generate(model, [], max_new_tokens=4) == []
    assert greedy_generate(model, prompts[:2], max_new_tokens=0) == [[], []]
    with pytest.raises(ValueError, match="at least one token"):
        greedy_generate(model, [[]], max_new_tokens=4)


@pytest.mark.slow
def test_bench_cpu_smoke_matches_the_naive_reference(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(REPO / "bench" / "validation_speed.py"), "--cpu-smoke",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = json.loads((tmp_path / "validation_speed.json").read_text())
    compared = [r for r in report["results"] if any(k.startswith("vs_") for k in r)]
    assert len(compared) == 14  # 9 fast variants on all prompts, 5 agreement checks on subsets
    for r in compared:  # fp32 on CPU: every comparison is exact
        assert all(v["identical_rows_pct"] == 100 for k, v in r.items() if k.startswith("vs_")), r["variant"]


@pytest.fixture(scope="module")
def instructed(prompts) -> list[list[int]]:
    """The prompts behind one shared 20-token instruction, as validation prompts are."""
    instruction = torch.randint(1, VOCAB, (20,), generator=torch.Generator().manual_seed(2)).tolist()
    return [instruction + p for p in prompts]


def test_a_shared_prompt_start_is_computed_once_with_the_same_tokens_as_generate(model, instructed) -> None:
    from gputwin.validate.fastgen import shared_prefix

    assert shared_prefix(instructed) == 20  # the instruction; the one-token prompt keeps its token
    reference = hf_greedy(model, instructed, 12)
    assert greedy_generate(model, instructed, max_new_tokens=12, pad_id=PAD) == reference
    assert greedy_generate(model, instructed, max_new_tokens=12, pad_id=PAD, share_prefix=False) == reference
    split = greedy_generate(model, instructed, max_new_tokens=12, pad_id=PAD, batch_size=4, prefill_tokens=20)
    assert split == reference  # batches find their own shared start; chunks hold rows after it
    assert len({tuple(r) for r in reference}) > 3


def test_shared_prefix_leaves_every_prompt_a_token_of_its_own() -> None:
    from gputwin.validate.fastgen import shared_prefix

    assert shared_prefix([[1, 2, 3], [1, 2, 3]]) == 2
    assert shared_prefix([[1, 2, 3], [1, 2, 4, 5]]) == 2
    assert shared_prefix([[1, 2], [3, 2]]) == 0
    assert shared_prefix([[1, 2, 3]]) == 0  # one prompt: nothing to share


def emulated_flash(query, keys, values, used, cu_q, cu_k, scale):
    """What flash varlen gives flash_decode, computed plainly: each row's first used[b] slots, and the
    log-sum-exp of its scaled scores ([B, H])."""
    heads, kv = query.shape[1], keys.shape[2]
    k, v = (x.transpose(1, 2).repeat_interleave(heads // kv, 1).float() for x in (keys, values))  # [B, H, S, D]
    scores = torch.einsum("bhd,bhsd->bhs", query.float(), k) * scale
    scores = scores.masked_fill(torch.arange(keys.shape[1]) >= used[:, None, None].long(), float("-inf"))
    lse = scores.logsumexp(-1)
    out = torch.einsum("bhs,bhsd->bhd", (scores - lse[..., None]).exp(), v)
    return out.to(query.dtype), lse


def test_flash_decode_joins_the_prefix_as_one_softmax(monkeypatch) -> None:
    """flash_decode's join of the rows' own slots and the shared prefix against a masked softmax over both
    (decoder._flash_decode_matches), with flash's part computed plainly; a wrong log-sum-exp fails it."""
    from gputwin.kernels import decoder

    monkeypatch.setattr(decoder, "_flash_own", emulated_flash)
    assert decoder._flash_decode_matches("cpu")
    monkeypatch.setattr(decoder, "_flash_own", lambda *a: (emulated_flash(*a)[0], emulated_flash(*a)[1] + 1.0))
    assert not decoder._flash_decode_matches("cpu")


def test_decoding_through_the_flash_layout_gives_the_tokens_of_generate(monkeypatch, model, prompts,
                                                                         instructed) -> None:
    """The flash path's token-major cache, per-row used slots and prefix join, on the CPU (flash's part
    computed plainly): generate's tokens, with eos ending rows early and with a shared prefix."""
    from gputwin.kernels import decoder

    calls = []
    monkeypatch.setattr(decoder, "_flash_own", lambda *a: calls.append(a[3].tolist()) or emulated_flash(*a))
    eos = [5, 9]
    assert greedy_generate(model, prompts, max_new_tokens=10, pad_id=PAD, eos_ids=eos, flash=True,
                           check_every=3) == hf_greedy(model, prompts, 10, eos=eos)
    assert greedy_generate(model, instructed, max_new_tokens=12, pad_id=PAD, flash=True) == hf_greedy(model,
                                                                                                     instructed, 12)
    assert calls and any(1 in used for used in calls)  # decode steps ran through it, ended rows reading one slot


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_cuda
def test_prefix_attention_with_flash_varlen_matches_the_masked_path_on_cuda() -> None:
    from gputwin.kernels import decoder

    device = torch.device("cuda")
    if decoder.varlen_backend(device) != "varlen":
        pytest.skip("no flash varlen attention in this torch")
    assert decoder._prefix_varlen_ok(device)
    generator = torch.Generator(device=device).manual_seed(3)
    lengths = torch.tensor([1, 31, 7, 64, 2])
    cu = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(device=device, dtype=torch.int32)
    tokens = int(lengths.sum())
    q, k, v = (torch.randn(1, h, tokens, 128, device=device, dtype=torch.bfloat16, generator=generator)
               for h in (16, 8, 8))
    pk, pv = (torch.randn(8, 175, 128, device=device, dtype=torch.bfloat16, generator=generator) for _ in range(2))
    fast = decoder.attend_after_prefix(q, k, v, pk, pv, cu, 64, 128 ** -0.5)
    masked = decoder.attend_after_prefix(q, k, v, pk, pv, cu, 64, 128 ** -0.5, decoder.block_causal_mask(cu, tokens))
    assert fast.shape == masked.shape == (1, tokens, 16, 128)
    assert float((fast.float() - masked.float()).abs().max()) < 2e-2


@needs_cuda
def test_shared_prefix_on_cuda_with_graphs_gives_the_tokens_of_generate(model, instructed) -> None:
    import copy

    gpu = copy.deepcopy(model).to("cuda")
    reference = hf_greedy(gpu, instructed, 12)
    assert greedy_generate(gpu, instructed, max_new_tokens=12, pad_id=PAD) == reference
    assert greedy_generate(gpu, instructed, max_new_tokens=12, pad_id=PAD, share_prefix=False) == reference
    half = copy.deepcopy(model).to("cuda", torch.bfloat16)
    shared = greedy_generate(half, instructed, max_new_tokens=12, pad_id=PAD)
    whole = greedy_generate(half, instructed, max_new_tokens=12, pad_id=PAD, share_prefix=False)
    same = sum(a == b for a, b in zip(shared, whole))
    assert same >= len(instructed) - 2, (shared, whole)  # bf16: a near-tie may go the other way


@needs_cuda
def test_flash_decode_on_cuda_gives_what_reading_every_slot_gives(model, prompts, instructed) -> None:
    import copy

    from gputwin.kernels import decoder

    assert decoder.flash_decode_ok(torch.device("cuda"))
    half = copy.deepcopy(model).to("cuda", torch.bfloat16)
    for batch in (prompts, instructed):
        flash = greedy_generate(half, batch, max_new_tokens=12, pad_id=PAD, eos_ids=[5], flash=True)
        masked = greedy_generate(half, batch, max_new_tokens=12, pad_id=PAD, eos_ids=[5], flash=False)
        assert sum(a == b for a, b in zip(flash, masked)) >= len(batch) - 2, (flash, masked)  # bf16 near-ties


def decode_adapters(model: torch.nn.Module, prompts: list[list[int]], scales: list[float],
                    keep: object | None) -> list[list[list[int]]]:
    """Greedy tokens with the adapter's B scaled by each of `scales` in turn (as another arm's or a probe's adapter
    would be), merged for the decode as validation merges it; with `keep`, into the same tensors each time."""
    from gputwin.validate.merge import merged_adapter

    lora_b = [p for name, p in model.named_parameters() if "lora_B" in name]
    saved = [p.detach().clone() for p in lora_b]
    into: dict[int, torch.Tensor] | None = {} if keep is not None else None
    out = []
    try:
        for scale in scales:
            with torch.no_grad():
                for p, original in zip(lora_b, saved):
                    p.copy_(original * scale)
            with merged_adapter(model, into=into) as merged:
                assert merged == 8  # q, k, v, o in both layers
                out.append(greedy_generate(model, prompts, max_new_tokens=12, pad_id=PAD, keep=keep))
    finally:
        with torch.no_grad():
            for p, original in zip(lora_b, saved):
                p.copy_(original)
    return out


def test_a_kept_decoder_serves_the_next_call_of_the_same_shapes_and_weights(model, instructed) -> None:
    from gputwin.validate.fastgen import Kept

    keep = Kept()
    kept = decode_adapters(model, instructed, [1.0, 4.0, 1.0], keep)
    assert keep.reused == 2 and keep.decoder is not None
    assert kept == decode_adapters(model, instructed, [1.0, 4.0, 1.0], None)
    assert kept[0] != kept[1] and kept[0] == kept[2]  # the adapter changed the tokens, and changed them back
    greedy_generate(model, instructed[:4], max_new_tokens=12, pad_id=PAD, keep=keep)  # another batch: a new one
    assert keep.reused == 2 and "rows" in keep.missed
    greedy_generate(model, instructed[:4], max_new_tokens=12, pad_id=PAD, keep=keep)  # the same again: it serves
    assert keep.reused == 3 and keep.missed == []
    decode_adapters(model, instructed[:4], [1.0], keep)  # merged: weight tensors the kept graph does not read
    assert keep.reused == 3 and keep.missed[0].startswith("weights (") and "q_proj" in keep.missed[0]


def test_validations_in_a_keeping_block_share_one_decoder_and_free_it_after() -> None:
    from gputwin.validate import predict

    assert predict._KEPT.get() is None
    with predict.keeping_decoders():
        kept = predict._KEPT.get()
        with predict.keeping_decoders():  # nested: the same one
            assert predict._KEPT.get() is kept
        assert kept is not None and kept.reused == 0
    assert predict._KEPT.get() is None


@needs_cuda
def test_a_kept_decoder_s_graph_decodes_the_adapter_merged_now_on_cuda(model, instructed) -> None:
    """The graph captured for one adapter, replayed for others merged into the same tensors, gives the tokens a
    fresh decoder gives each of them (bf16, flash decode, shared prefix)."""
    import copy

    from gputwin.validate.fastgen import Kept

    half = copy.deepcopy(model).to("cuda", torch.bfloat16)
    keep = Kept()
    kept = decode_adapters(half, instructed, [1.0, 6.0, 1.0], keep)
    assert keep.reused == 2
    assert kept == decode_adapters(half, instructed, [1.0, 6.0, 1.0], None)
    assert kept[0] != kept[1]


def test_the_prompts_decode_in_one_batch_while_their_cache_takes_half_the_free_memory(model, monkeypatch) -> None:
    from gputwin.kernels.decoder import decoder_parts
    from gputwin.validate import fastgen

    parts = decoder_parts(model)
    config = parts.config
    per_row = 2 * len(parts.layers) * config.num_key_value_heads * 448 * config.head_dim * 2 + 4 * config.vocab_size * 2
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (int(2.1 * 500 * per_row), 10 ** 12))
    assert fastgen._auto_batch_size(parts, 500, 448, torch.bfloat16, cuda) == 500
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (int(1.5 * 500 * per_row), 10 ** 12))
    assert fastgen._auto_batch_size(parts, 500, 448, torch.bfloat16, cuda) == 375  # more would crowd the rest out
    # a kept decoder's cache is used again or freed first: it counts as free
    assert fastgen._auto_batch_size(parts, 500, 448, torch.bfloat16, cuda, reclaimable=500 * per_row) == 500
