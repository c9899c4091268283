"""The fast training path computes what the plain padded step computes (tiny Qwen3 on CPU, fp32)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import Qwen3Config, Qwen3ForCausalLM

from gputwin.core.encoding import IGNORE_INDEX
from gputwin.train.batching import Example
from gputwin.train.engine import EngineUnsupported, NonFiniteLoss, StepOutput, make_engine
from gputwin.kernels.decoder import block_causal_mask, decoder_parts, fuse_rms_norms, masked_attention, run_decoder
from gputwin.train.fast import FastEngine, FastStep, preserved_state
from gputwin.train.packing import answer_only_loss, pack

REPO = Path(__file__).resolve().parents[1]
VOCAB = 96


def tiny_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = Qwen3Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256)
    model = get_peft_model(Qwen3ForCausalLM(config), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                                target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    with torch.no_grad():  # a non-zero adapter, so LoRA takes part in every check
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1)
    return model


def samples(n: int, seed: int = 1, low: int = 6, high: int = 40) -> list[dict[str, list[int]]]:
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(low, high, (1,), generator=generator))
        ids = torch.randint(1, VOCAB, (length,), generator=generator).tolist()
        prompt = int(length * 0.7)
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return out


def padded(batch: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
    width = max(len(s["input_ids"]) for s in batch)
    ids = torch.zeros(len(batch), width, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX)
    mask = torch.zeros(len(batch), width, dtype=torch.long)
    for row, s in enumerate(batch):
        n = len(s["input_ids"])
        ids[row, :n], labels[row, :n], mask[row, :n] = torch.tensor(s["input_ids"]), torch.tensor(s["labels"]), 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


# ---------------------------------------------------------------- pack


def test_pack_lays_samples_back_to_back_with_own_positions_and_next_token_targets() -> None:
    batch = [{"input_ids": [5, 6, 7, 8], "labels": [IGNORE_INDEX, IGNORE_INDEX, 7, 8]},
             {"input_ids": [9, 10, 11], "labels": [IGNORE_INDEX, 10, 11]}]
    packed = pack(batch, bucket=8, label_bucket=4, pad_id=0)
    assert packed.input_ids.tolist() == [[5, 6, 7, 8, 9, 10, 11, 0]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 2, 0]]
    assert packed.cu_seqlens.tolist() == [0, 4, 7, 8]  # the padding is a segment of its own
    # position 1 predicts token 7, 2 predicts 8, 4 predicts 10, 5 predicts 11; never across samples
    assert packed.label_index.tolist()[:4] == [1, 2, 4, 5]
    assert packed.label_target.tolist() == [7, 8, 10, 11]
    assert (packed.n_tokens, packed.n_label_tokens, packed.n_samples) == (7, 4, 2)


def test_pack_pads_to_buckets_and_keeps_a_padding_segment() -> None:
    batch = [{"input_ids": [1] * 8, "labels": [IGNORE_INDEX] * 3 + [1] * 5}]
    packed = pack(batch, bucket=8, label_bucket=4)
    assert packed.length == 16 and packed.cu_seqlens.tolist() == [0, 8, 16]  # 8 tokens + at least one pad
    assert packed.shape_key == (16, 8, 1, 512)  # the attention bound: the longest segment, at least 512
    long = pack([{"input_ids": [1] * 600, "labels": [1] * 600}], bucket=8, label_bucket=4)
    assert long.attention_bound == 1024 >= max(long.cu_seqlens.diff().tolist())
    assert packed.label_target.tolist() == [1] * 5 + [IGNORE_INDEX] * 3
    with pytest.raises(ValueError, match="input_ids"):
        pack([{"input_ids": [1, 2], "labels": [1]}])


def test_block_causal_mask_attention_equals_attention_per_sample() -> None:
    torch.manual_seed(3)
    cu = torch.tensor([0, 5, 12, 16], dtype=torch.int32)
    q, k, v = torch.randn(1, 4, 16, 8), torch.randn(1, 2, 16, 8), torch.randn(1, 2, 16, 8)
    out = masked_attention(q, k, v, cu, 8 ** -0.5)
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist()):
        part = F.scaled_dot_product_attention(q[:, :, start:end], k[:, :, start:end].repeat_interleave(2, 1),
                                              v[:, :, start:end].repeat_interleave(2, 1), is_causal=True)
        torch.testing.assert_close(out[0, start:end], part[0].transpose(0, 1), atol=1e-6, rtol=1e-5)
    assert not block_causal_mask(cu, 16)[0, 0, 5, 4]  # the first token of a sample sees nothing before it


# ---------------------------------------------------------------- loss


def test_packed_loss_equals_padded_batch_loss() -> None:
    model, batch = tiny_model(), samples(4)
    reference = model(**padded(batch)).loss
    fast = answer_only_loss(model, pack(batch, bucket=16, label_bucket=8))
    assert abs(fast.item() - reference.item()) < 1e-5


def test_label_only_loss_equals_full_logit_loss() -> None:
    model, packed = tiny_model(), pack(samples(3, seed=5), bucket=32)
    parts = decoder_parts(model)
    hidden = run_decoder(parts, packed.input_ids, packed.position_ids, cu_seqlens=packed.cu_seqlens,
                         max_len=packed.length)
    targets = torch.full((packed.length,), IGNORE_INDEX)
    real = packed.label_target != IGNORE_INDEX
    targets[packed.label_index[real]] = packed.label_target[real]
    full = F.cross_entropy(parts.lm_head(hidden[0]).float(), targets, ignore_index=IGNORE_INDEX)
    assert abs(answer_only_loss(model, packed).item() - full.item()) < 1e-5


# ---------------------------------------------------------------- the step


def plain_padded_steps(batches: list[list[dict]], lr: float) -> tuple[list[tuple[float, float]], torch.nn.Module]:
    model = tiny_model()
    optimizer = torch.optim.AdamW(trainable(model), lr=lr)
    out = []
    for batch in batches:
        loss = model(**padded(batch)).loss
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(trainable(model), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        out.append((float(loss), float(norm)))
    return out, model


def test_fast_steps_follow_the_plain_padded_loop() -> None:
    data = samples(16, seed=9)
    batches = [data[i:i + 4] for i in range(0, 16, 4)]
    plain, plain_model = plain_padded_steps(batches, lr=1e-2)
    model = tiny_model()
    step = FastStep(model, torch.optim.AdamW(trainable(model), lr=1e-2), grad_clip=1.0)
    assert not step.use_graphs and not step.use_compile  # CPU defaults
    fast = []
    for batch in batches:
        result = step(pack(batch, bucket=16))
        assert result.n_tokens == sum(len(s["input_ids"]) for s in batch)
        fast.append((float(result.loss), float(result.grad_norm)))
    for (loss_a, norm_a), (loss_b, norm_b) in zip(plain, fast):
        assert abs(loss_a - loss_b) < 1e-5 and abs(norm_a - norm_b) < 1e-5
    for a, b in zip(trainable(plain_model), trainable(model)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_compiled_layers_step_like_the_eager_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    """train.compile: the decoder layers through torch.compile (traced with aot_eager here: Dynamo and AOT
    autograd as on a GPU, without generating kernels) give the eager step's losses, norms and weights."""
    import gputwin.train.fast as fast

    monkeypatch.setattr(fast, "COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    data = samples(12, seed=5)
    batches = [data[i:i + 4] for i in range(0, 12, 4)]
    runs = []
    for compile in (False, True):
        model = tiny_model()
        step = FastStep(model, torch.optim.AdamW(trainable(model), lr=1e-2), compile=compile)
        assert step.paths["compile"]["on"] is compile
        # a new shape may compile the layers again: with compile every shape's first step is eager, never captured
        assert step.graphs.eager_first == (True if compile else "once")
        runs.append(([(float(r.loss), float(r.grad_norm)) for r in (step(pack(b, bucket=16)) for b in batches)],
                     [p.detach().clone() for p in trainable(model)]))
    (eager, eager_weights), (compiled, compiled_weights) = runs
    for (loss_a, norm_a), (loss_b, norm_b) in zip(eager, compiled):
        assert abs(loss_a - loss_b) < 1e-5 and abs(norm_a - norm_b) < 1e-5
    for a, b in zip(eager_weights, compiled_weights):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_a_failing_compilation_leaves_the_run_on_eager_layers(monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    import gputwin.train.fast as fast

    def broken(graph: object, inputs: object) -> None:
        raise RuntimeError("no kernels for this layer")

    monkeypatch.setattr(fast, "COMPILE_BACKEND", broken)
    torch._dynamo.reset()
    batch = samples(4, seed=13)
    plain, _ = plain_padded_steps([batch], lr=1e-3)
    model = tiny_model()
    optimizer = torch.optim.AdamW(trainable(model), lr=1.0)
    engine = FastEngine(model, optimizer, device=torch.device("cpu"), model_dtype=torch.float32, grad_clip=1.0,
                        pad_id=0)
    engine.fast = FastStep(model, optimizer, compile=True)  # as on a GPU (a CPU engine does not compile)
    engine.paths = engine.fast.paths
    output = engine.step(engine.collate([Example(s["input_ids"], s["labels"], False) for s in batch]), lr=1e-3)
    assert abs(output.loss - plain[0][0]) < 1e-5 and abs(output.grad_norm - plain[0][1]) < 1e-5
    assert not engine.fast.use_compile and engine.paths["compile"]["on"] is False
    assert engine.fast.graphs.eager_first == "once"  # eager layers: new shapes are captured when met again
    assert "compilation failed" in engine.paths["compile"]["why"] and "no kernels" in capsys.readouterr().err


def test_preserved_state_undoes_warmup_steps() -> None:
    data = samples(8, seed=11)
    model = tiny_model()
    optimizer = torch.optim.AdamW(trainable(model), lr=1e-2)
    step = FastStep(model, optimizer)
    before = [p.detach().clone() for p in trainable(model)]
    with preserved_state(optimizer, trainable(model)):
        step(pack(data[:4]))
        step(pack(data[4:]))
    for p, saved in zip(trainable(model), before):
        assert torch.equal(p, saved)
    for p in trainable(model):  # state created inside is Adam's fresh state again
        assert all(float(v.abs().sum()) == 0 for v in optimizer.state[p].values())
    # and the next real step is the first step of an untouched run
    reference, _ = plain_padded_steps([data[:4]], lr=1e-2)
    assert abs(float(step(pack(data[:4])).loss) - reference[0][0]) < 1e-5
    assert all(float(optimizer.state[p]["step"]) == 1 for p in trainable(model))


def test_non_finite_step_updates_nothing_and_the_engine_reports_it() -> None:
    model = tiny_model()
    optimizer = torch.optim.AdamW(trainable(model), lr=1e-2)
    engine = FastEngine(model, optimizer, device=torch.device("cpu"), model_dtype=torch.float32, grad_clip=1.0,
                        pad_id=0)
    with torch.no_grad():
        trainable(model)[0].fill_(float("nan"))
    others = [p.detach().clone() for p in trainable(model)[1:]]
    with pytest.raises(NonFiniteLoss):
        engine.step(engine.collate([Example(s["input_ids"], s["labels"], False) for s in samples(4)]), lr=1e-2)
    for p, saved in zip(trainable(model)[1:], others):
        assert torch.equal(p, saved)


def test_fast_engine_is_the_trainers_fast_engine_and_steps_like_the_plain_one() -> None:
    batch = samples(4, seed=13)
    plain, _ = plain_padded_steps([batch], lr=1e-3)
    model = tiny_model()
    engine = make_engine("fast", model, torch.optim.AdamW(trainable(model), lr=1.0), device=torch.device("cpu"),
                         model_dtype=torch.float32, grad_clip=1.0, pad_id=0)
    assert isinstance(engine, FastEngine)
    output = engine.step(engine.collate([Example(s["input_ids"], s["labels"], False) for s in batch]), lr=1e-3)
    assert isinstance(output, StepOutput)
    assert abs(output.loss - plain[0][0]) < 1e-5 and abs(output.grad_norm - plain[0][1]) < 1e-5


def test_fast_engine_declines_models_without_a_causal_lm_head() -> None:
    encoder = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(EngineUnsupported, match="embed_tokens"):
        FastEngine(encoder, torch.optim.AdamW(encoder.parameters()), device=torch.device("cpu"),
                   model_dtype=torch.float32, grad_clip=1.0, pad_id=0)


@pytest.mark.slow
def test_bench_cpu_smoke_runs_every_variant_with_matching_losses(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(REPO / "bench" / "train_throughput.py"), "--cpu-smoke", "--steps", "4",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = json.loads((tmp_path / "train_throughput.json").read_text())
    results = {r["variant"]: r for r in report["results"]}
    assert set(results) == {"baseline", "lean-padded", "packed", "packed+graphs", "packed+graphs+plan",
                            "packed+compile+graphs", "engine",
                            "packed+graphs+hfnorm", "packed+graphs+peftlora", "packed+graphs+hfrope",
                            "packed+graphs+rollrope", "engine+rollrope", "engine+compile",
                            "engine+eagereach", "engine+leancapture", "packed+graphs+lorapercall", "engine+coarse",
                            "engine+readlast", "engine+torchce", "packed+graphs+torchce", "engine+hfmlp", "packed+graphs+hfmlp",
                            "engine+torchnorm", "engine+torchdropgrad"}
    for name, r in results.items():
        assert len(r["losses"]) == 4 and r["tokens_per_s"] > 0
        if name != "baseline":
            assert r["loss_gap_vs_baseline"]["max_rel_gap_raw"] < 1e-5, name
    assert results["engine"]["nan_step_raised"] and results["engine"]["nan_step_left_weights_unchanged"]
    # the planned shapes pad less than the coarse buckets, and compute the same losses (checked above)
    assert results["engine"]["padding_share"] < results["engine+coarse"]["padding_share"]
    assert results["engine"]["label_slot_share"] > results["engine+coarse"]["label_slot_share"]
    # the bench step on the engine's planned shapes pads exactly as the engine does
    assert results["packed+graphs+plan"]["padding_share"] == results["engine"]["padding_share"]


def test_varlen_check_runs_from_inference_code_and_rejects_a_wrong_kernel() -> None:
    from gputwin.kernels import decoder as fast

    def right(q, k, v, cu, max_len, scale):  # [T, H, D] in and out, like torch's varlen kernel
        as_rows = [x.transpose(0, 1).unsqueeze(0) for x in (q, k, v)]
        return fast.masked_attention(*as_rows, cu, scale)[0]

    def wrong(q, k, v, cu, max_len, scale):  # ignores the sample boundaries
        return right(q, k, v, torch.tensor([0, q.shape[0]], dtype=torch.int32), max_len, scale)

    def wrong_heads(q, k, v, cu, max_len, scale):  # K/V heads paired with the wrong query heads
        groups = q.shape[1] // k.shape[1]
        return right(q, *(x.repeat(1, groups, 1) for x in (k, v)), cu, max_len, scale)

    with torch.inference_mode():  # where a validator asks first: the check's backward must still run
        assert fast._varlen_matches_sdpa(right, "cpu")
        assert not fast._varlen_matches_sdpa(wrong, "cpu")
        assert not fast._varlen_matches_sdpa(wrong_heads, "cpu")


def test_fused_rms_norms_give_the_same_loss_and_gradients() -> None:
    batch = pack(samples(4, seed=5))
    results = []
    for fused in (False, True):
        model = tiny_model(seed=3)
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():  # norm weights other than their initial ones, so the weight's place counts
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.copy_(torch.rand(p.shape, generator=generator) + 0.5)
        if fused:
            assert fuse_rms_norms(model) == 2 * 4 + 1  # per layer: input, post-attention, q and k norms; final
        loss = answer_only_loss(model, batch)
        loss.backward()
        results.append((float(loss), [p.grad.clone() for p in trainable(model)]))
    (plain_loss, plain_grads), (fused_loss, fused_grads) = results
    assert abs(fused_loss - plain_loss) < 1e-5
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(plain_grads, fused_grads))


def test_fused_rms_norms_leave_other_dtypes_to_the_models_own_forward() -> None:
    model = tiny_model(seed=3)
    norm = decoder_parts(model).body.norm
    fuse_rms_norms(model)
    hidden = torch.randn(2, 5, 64, dtype=torch.float64)
    expected = type(norm).forward(norm, hidden)
    assert torch.equal(norm(hidden), expected) and expected.dtype == torch.float64

