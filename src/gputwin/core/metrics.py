"""Entity-level precision, recall and F1 of extracted PII, and the paired bootstrap that says
whether a difference between two arms is more than noise.

Pure Python + numpy (no torch, no Textual), so the UI, ``status`` and reports can score and
compare validation results cheaply. docs/validation.md describes the result format and the
conventions chosen here (normalisation, empty cases, interval method).
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from statistics import NormalDist
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

# Resample in chunks so memory stays bounded (a few tens of MB) for any sample count.
_CHUNK_CELLS = 1_000_000
_WHITESPACE = re.compile(r"\s+")
_TYPE_SEPARATORS = re.compile(r"[\s\-]+")
_EDGE_PUNCTUATION = frozenset({"Po", "Pd", "Pi", "Pf"})  # . , ; : ! ? " ' - and quote marks of any script
_BRACKETS = {"(": ")", "[": "]", "{": "}", "<": ">"}
_CLOSERS = {v: k for k, v in _BRACKETS.items()}

METRICS = ("precision", "recall", "f1")


# ---------------------------------------------------------------- normalisation


def normalize_value(value: Any) -> str:
    """The form two entity values are compared in.

    NFKC (full-width digits and letters become ASCII, so "１３８" equals "138"), casefold
    ("X" at the end of a Chinese ID number equals "x"), whitespace runs collapsed to one space,
    and punctuation or unbalanced brackets around the value stripped ('"John Smith",' equals
    'John Smith'). Separators inside a value are kept: phone, card and ID numbers are not reduced
    to digits, because the task is to extract the value as written and a reformatted number is a
    different string.
    """
    text = _WHITESPACE.sub(" ", unicodedata.normalize("NFKC", str(value)).casefold()).strip()
    while text:
        stripped = _strip_edges(text)
        if stripped == text:
            break
        text = stripped
    return text


def _strip_edges(text: str) -> str:
    """One pass of removing junk around a value; called until nothing changes."""
    start, end = 0, len(text)
    while start < end and (text[start].isspace() or unicodedata.category(text[start]) in _EDGE_PUNCTUATION):
        start += 1
    while end > start and (text[end - 1].isspace() or unicodedata.category(text[end - 1]) in _EDGE_PUNCTUATION):
        end -= 1
    text = text[start:end]
    if len(text) >= 2 and _BRACKETS.get(text[0]) == text[-1] and _balanced_inside(text[1:-1], text[0]):
        return text[1:-1]
    if text and text[0] in _BRACKETS and _BRACKETS[text[0]] not in text:
        return text[1:]
    if text and text[-1] in _CLOSERS and _CLOSERS[text[-1]] not in text:
        return text[:-1]
    return text


def _balanced_inside(inner: str, opener: str) -> bool:
    """True when removing the outer pair leaves the inner brackets balanced: "(a) (b)" is not wrapped."""
    depth, closer = 0, _BRACKETS[opener]
    for ch in inner:
        if ch == opener:
            depth += 1
        elif ch == closer:
            depth -= 1
            if depth < 0:
                return False
    return depth == 0


def normalize_type(value: Any) -> str:
    """Entity types compare upper-case with '_' for spaces and hyphens: "phone number" == "PHONE_NUMBER"."""
    text = unicodedata.normalize("NFKC", str(value)).strip().upper()
    return _TYPE_SEPARATORS.sub("_", text)


def _fields(entity: Any) -> tuple[str, str, int | None, int | None]:
    """(type, value, start, end) of an entity object (attributes) or a dict from a JSON file."""
    if isinstance(entity, Mapping):
        return entity["type"], entity["value"], entity.get("start"), entity.get("end")
    return entity.type, entity.value, getattr(entity, "start", None), getattr(entity, "end", None)


# ---------------------------------------------------------------- precision / recall / F1


def prf_arrays(tp: Any, fp: Any, fn: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision, recall and F1 for arrays of counts, with the conventions of ``prf``."""
    tp, fp, fn = (np.asarray(x, dtype=np.float64) for x in (tp, fp, fn))
    nothing = (tp + fp + fn) == 0
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(tp + fp > 0, tp / (tp + fp), 0.0)
        recall = np.where(tp + fn > 0, tp / (tp + fn), 0.0)
        f1 = np.where(nothing, 1.0, 2 * tp / (2 * tp + fp + fn))
    return np.where(nothing, 1.0, precision), np.where(nothing, 1.0, recall), f1


def prf(tp: int, fp: int, fn: int) -> tuple[float, float, float]:
    """Precision, recall, F1 from counts.

    Nothing expected and nothing predicted is a perfect score (1, 1, 1). Otherwise an empty
    denominator gives 0: no predictions -> precision 0; predictions but no gold -> recall 0.
    ``undefined`` names those cases. F1 = 2tp / (2tp + fp + fn), the harmonic mean where defined.
    """
    p, r, f = prf_arrays(tp, fp, fn)
    return float(p), float(r), float(f)


def undefined(tp: int, fp: int, fn: int) -> list[str]:
    """Which of precision/recall had a zero denominator and was set by convention, not measured."""
    if tp + fp + fn == 0:
        return []
    out = []
    if tp + fp == 0:
        out.append("precision")
    if tp + fn == 0:
        out.append("recall")
    return out


def _scores(tp: int, fp: int, fn: int) -> dict[str, Any]:
    p, r, f = prf(tp, fp, fn)
    return {"precision": p, "recall": r, "f1": f, "tp": tp, "fp": fp, "fn": fn, "undefined": undefined(tp, fp, fn)}


def _unmatched(entities: Sequence[Any], keys: list[tuple], matched: Counter) -> list[dict[str, str]]:
    """Entities left over once each matched key has been used as many times as it matched."""
    budget = Counter(matched)
    left = []
    for entity, key in zip(entities, keys):
        if budget[key] > 0:
            budget[key] -= 1
        else:
            left.append({"type": key[0], "value": str(_fields(entity)[1])})
    return left


def evaluate(
    gold: Sequence[Sequence[Any]],
    pred: Sequence[Sequence[Any]],
    *,
    texts: Sequence[str],
    indices: Sequence[int],
    use_spans: bool = False,
    worst: int = 20,
) -> dict[str, Any]:
    """Score predicted entities against gold ones, sample by sample; the JSON-ready core of a validation result.

    An entity matches on (type, normalised value), and also on its (start, end) span when
    ``use_spans``. Each sample is a multiset: an entity given twice must be found twice.
    Counts are pooled over samples (micro), per type, and kept per sample for the bootstrap.
    """
    n = len(indices)
    if not len(gold) == len(pred) == len(texts) == n:
        raise ValueError(f"evaluate needs one gold list, prediction list and text per index; got gold {len(gold)}, "
                         f"pred {len(pred)}, texts {len(texts)}, indices {n}")

    def key(entity: Any) -> tuple:
        etype, value, start, end = _fields(entity)
        base = (normalize_type(etype), normalize_value(value))
        return base + (start, end) if use_spans else base

    per_sample: list[list[int]] = []
    by_type: dict[str, list[int]] = {}
    errors: list[tuple[int, int, list[dict[str, str]], list[dict[str, str]]]] = []
    for position, (gold_entities, pred_entities) in enumerate(zip(gold, pred)):
        gold_keys = [key(e) for e in gold_entities]
        pred_keys = [key(e) for e in pred_entities]
        gold_count, pred_count = Counter(gold_keys), Counter(pred_keys)
        matched = gold_count & pred_count
        tp = sum(matched.values())
        fp, fn = len(pred_keys) - tp, len(gold_keys) - tp
        per_sample.append([tp, fp, fn])
        for k, count in gold_count.items():
            row = by_type.setdefault(k[0], [0, 0, 0])
            row[0] += matched[k]
            row[2] += count - matched[k]
        for k, count in pred_count.items():
            by_type.setdefault(k[0], [0, 0, 0])[1] += count - matched[k]
        if fp or fn:
            errors.append((fp + fn, position, _unmatched(gold_entities, gold_keys, matched),
                           _unmatched(pred_entities, pred_keys, matched)))

    totals = np.asarray(per_sample, dtype=np.int64).reshape(-1, 3).sum(axis=0)
    tp, fp, fn = (int(x) for x in totals)
    per_type = {}
    for etype in sorted(by_type):
        t_tp, t_fp, t_fn = by_type[etype]
        per_type[etype] = {**_scores(t_tp, t_fp, t_fn), "support": t_tp + t_fn}
    macro = float(np.mean([row["f1"] for row in per_type.values()])) if per_type else 1.0
    errors.sort(key=lambda e: (-e[0], e[1]))
    examples = [
        {"index": indices[pos], "text": texts[pos], "missed": missed, "invented": invented}
        for _, pos, missed, invented in errors[: max(0, worst)]
    ]
    return {
        **_scores(tp, fp, fn),
        "macro_f1": macro,
        "n": n,
        "match": "type+value+span" if use_spans else "type+value",
        "indices": [int(i) for i in indices],
        "per_type": per_type,
        "per_sample": per_sample,
        "examples": examples,
    }


# ---------------------------------------------------------------- bootstrap


def as_counts(rows: Any) -> np.ndarray:
    """Per-sample [tp, fp, fn] rows as an (n, 3) integer array; raises ValueError on any other shape."""
    counts = np.asarray(rows, dtype=np.int64)
    if counts.size == 0:
        return counts.reshape(0, 3)
    if counts.ndim != 2 or counts.shape[1] != 3:
        raise ValueError(f"per-sample counts must be [tp, fp, fn] rows, got shape {counts.shape}")
    if (counts < 0).any():
        raise ValueError("per-sample counts must not be negative")
    return counts


def resampled_totals(arms: Iterable[Any], *, resamples: int, seed: int) -> list[np.ndarray]:
    """Pooled [tp, fp, fn] of each arm for each bootstrap resample, shape (resamples, 3) per arm.

    All arms share the same resampled sample indices (a paired bootstrap), and the indices depend
    only on (n, resamples, seed): the same baseline gets the same intervals in every comparison.
    """
    counts = [as_counts(a) for a in arms]
    n = len(counts[0])
    if n == 0:
        raise ValueError("cannot bootstrap zero samples")
    if any(len(c) != n for c in counts):
        raise ValueError(f"paired arms need the same samples; got sizes {[len(c) for c in counts]}")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    stacked = np.concatenate(counts, axis=1)
    totals = np.empty((resamples, stacked.shape[1]), dtype=np.int64)
    rng = np.random.default_rng(seed)
    chunk = max(1, _CHUNK_CELLS // n)
    for start in range(0, resamples, chunk):
        size = min(resamples, start + chunk) - start
        rows = rng.integers(0, n, size=(size, n))
        # How often each sample was drawn, then one integer matrix product: far faster than gathering
        # rows, exact, and free of BLAS threads that crawl on a busy machine.
        draws = np.bincount((rows + np.arange(size)[:, None] * n).ravel(), minlength=size * n)
        totals[start:start + size] = draws.reshape(size, n) @ stacked
    return [totals[:, 3 * i: 3 * i + 3] for i in range(len(counts))]


def _percentiles(values: np.ndarray, confidence: float) -> tuple[float, float]:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be between 0 and 1, got {confidence}")
    tail = (1.0 - confidence) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def _point(counts: np.ndarray) -> tuple[float, float, float]:
    return prf(*(int(x) for x in counts.sum(axis=0)))


def interval_stats(counts: Any, totals: np.ndarray, *, confidence: float = 0.95) -> dict[str, dict[str, float]]:
    """Precision/recall/F1 of one arm (``value``) with percentile intervals from its resampled totals."""
    resampled = prf_arrays(totals[:, 0], totals[:, 1], totals[:, 2])
    out = {}
    for name, value, values in zip(METRICS, _point(as_counts(counts)), resampled):
        low, high = _percentiles(values, confidence)
        out[name] = {"value": value, "low": low, "high": high}
    return out


def difference_stats(counts_a: Any, totals_a: np.ndarray, counts_b: Any, totals_b: np.ndarray, *,
                     confidence: float = 0.95) -> dict[str, dict[str, float]]:
    """b - a per metric: ``diff`` (point estimate), interval ``low``..``high``, bootstrap ``se``,
    and ``p_b_better``, the share of resamples where b scored higher than a."""
    resampled_a = prf_arrays(totals_a[:, 0], totals_a[:, 1], totals_a[:, 2])
    resampled_b = prf_arrays(totals_b[:, 0], totals_b[:, 1], totals_b[:, 2])
    out = {}
    for name, pa, pb, ra, rb in zip(METRICS, _point(as_counts(counts_a)), _point(as_counts(counts_b)),
                                    resampled_a, resampled_b):
        diffs = rb - ra
        low, high = _percentiles(diffs, confidence)
        out[name] = {"diff": pb - pa, "low": low, "high": high,
                     "se": float(diffs.std(ddof=1)) if len(diffs) > 1 else 0.0,
                     "p_b_better": float(np.mean(diffs > 0))}
    return out


def arm_intervals(counts: Any, *, resamples: int = 2000, seed: int = 0, confidence: float = 0.95) -> dict[str, Any]:
    """One arm's precision/recall/F1 with percentile bootstrap intervals."""
    (totals,) = resampled_totals([counts], resamples=resamples, seed=seed)
    return interval_stats(counts, totals, confidence=confidence)


def pooled_intervals(tp: int, fp: int, fn: int, *, resamples: int = 2000, seed: int = 0,
                     confidence: float = 0.95) -> dict[str, Any]:
    """Precision/recall/F1 of pooled counts with intervals from resampling the entity outcomes themselves.

    For scores whose per-sample counts are not kept (a validation file keeps per-type counts pooled
    only): each resample draws tp + fp + fn outcomes with the observed shares. Entities of one sample
    are treated as independent, so these intervals run somewhat narrower than the sample-level
    bootstrap of ``arm_intervals``. No outcome at all is the perfect score of ``prf``, with no spread.
    """
    counts = np.asarray([[tp, fp, fn]], dtype=np.int64)
    total = tp + fp + fn
    if total == 0:
        totals = np.zeros((max(1, resamples), 3), dtype=np.int64)
    else:
        rng = np.random.default_rng(seed)
        totals = rng.multinomial(total, [tp / total, fp / total, fn / total], size=max(1, resamples))
    return interval_stats(counts, totals, confidence=confidence)


def paired_bootstrap(
    a: Any, b: Any, *, resamples: int = 2000, seed: int = 0, confidence: float = 0.95
) -> dict[str, Any]:
    """How much better b is than a (b - a) in F1, precision and recall, and how sure we can be.

    Both arms are resampled on the same samples; micro metrics are recomputed from the pooled
    resampled counts (never a mean of per-sample F1). Per metric see ``difference_stats``;
    ``a`` and ``b`` hold each arm's own intervals from the same resamples.
    """
    totals_a, totals_b = resampled_totals([a, b], resamples=resamples, seed=seed)
    return {
        "n": len(as_counts(a)), "resamples": resamples, "seed": seed, "confidence": confidence,
        **difference_stats(a, totals_a, b, totals_b, confidence=confidence),
        "a": interval_stats(a, totals_a, confidence=confidence),
        "b": interval_stats(b, totals_b, confidence=confidence),
    }


def f1_diff_standard_error(a: Any, b: Any) -> float:
    """Standard error of micro-F1(b) - micro-F1(a) by linearising F1 = sum(2tp) / sum(2tp + fp + fn).

    Deterministic and instant; agrees with the bootstrap's ``se`` to within a few percent at
    realistic sample sizes.
    """
    counts_a, counts_b = as_counts(a).astype(np.float64), as_counts(b).astype(np.float64)
    n = len(counts_a)
    if n < 2 or len(counts_b) != n:
        raise ValueError(f"need the same two or more samples in both arms, got {len(counts_a)} and {len(counts_b)}")

    def influence(counts: np.ndarray) -> np.ndarray:
        numerator = 2 * counts[:, 0]
        denominator = numerator + counts[:, 1] + counts[:, 2]
        if denominator.sum() == 0:
            return np.zeros(n)
        f1 = numerator.sum() / denominator.sum()
        return (numerator - f1 * denominator) / denominator.mean()

    return float(np.std(influence(counts_b) - influence(counts_a), ddof=1) / math.sqrt(n))


def samples_needed(observed_diff: float, a: Any, b: Any, margin: float, *, confidence: float = 0.95) -> int | None:
    """Roughly how many samples would make the interval for a difference this size exclude zero.

    The standard error shrinks with sqrt(n), so n_needed = n * (z * se / |diff|)^2. None when no
    sample count would settle it: a difference of zero, or one smaller than ``margin`` (the
    verdict calls such arms too close whatever the interval says).
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be between 0 and 1, got {confidence}")
    if observed_diff == 0 or abs(observed_diff) < margin:
        return None
    n = len(as_counts(a))
    se = f1_diff_standard_error(a, b)
    if se == 0:
        return n
    z = NormalDist().inv_cdf(1 - (1 - confidence) / 2)
    return int(math.ceil(n * (z * se / abs(observed_diff)) ** 2))


# ---------------------------------------------------------------- comparing two results


def _entity_key(entity: Mapping[str, Any]) -> tuple[str, str]:
    return normalize_type(entity["type"]), normalize_value(entity["value"])


def disagreements(found_by: Mapping[str, Any], missed_by: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Entities that ``missed_by`` missed and ``found_by`` found, from two validation results.

    Only samples listed in ``missed_by``'s examples can be checked; the other arm found an entity
    when its own example for that sample does not list it as missed, or when it missed nothing there.
    """
    other_examples = {ex["index"]: ex for ex in found_by.get("examples", [])}
    position = {index: pos for pos, index in enumerate(found_by.get("indices") or [])}
    per_sample = found_by.get("per_sample", [])
    out = []
    for example in missed_by.get("examples", []):
        other = other_examples.get(example["index"])
        if other is not None:
            still_missed = Counter(_entity_key(e) for e in other.get("missed", []))
        else:
            pos = position.get(example["index"])
            if pos is None or pos >= len(per_sample) or per_sample[pos][2] != 0:
                continue  # not known what the other arm did on this sample
            still_missed = Counter()
        for entity in example.get("missed", []):
            key = _entity_key(entity)
            if still_missed[key] > 0:
                still_missed[key] -= 1
            else:
                out.append({"index": example["index"], "type": entity["type"], "value": entity["value"],
                            "text": example.get("text", "")})
    return out
