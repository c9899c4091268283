"""Tokenised training data kept on disk, keyed by everything that determines it, shared by arms and experiments.

    load_training_data(train_file, tokenizer, ...) -> TrainingData   the examples, label names and bad-line count
                                      of a data file: from the cache when it holds them, else read, tokenised
                                      and saved there (status in TrainingData.cache)
    lookup(train_file, ...) -> TrainingData | None   the cached data only (no tokenizer needed): a trainer
                                      whose data is cached starts without loading its tokenizer at all
    cache_folder(logs_root)           logs/.cache/tokenized/: one file per key
    to_wire(datas) / from_wire(raw)   the data of several files as bytes, in the cache's format, with their status:
                                      how a fork of the trainer that tokenised them hands them back

Tokenising the seed's 3,516 samples is most of a trainer's start-up, and every arm of every experiment on the
same data and tokenizer would do the same work again. The key is a SHA-256 of the data file's bytes, the
tokenizer folder's files (all but weights), the task, max_length, trust_remote_code, the versions of the
tokenising libraries and the source of gputwin's own encoding modules: change any of them and the key changes.
The label names of the tag head and the bad-line count are a function of the data file, and the tokenizer's
special ids (pad, eos, bos) and size a function of the tokenizer folder, so they are stored, not keyed: with
them a trainer on cached data needs its tokenizer only to validate, and loads it once training runs.

Two arms starting at once: the first takes ``<key>.lock`` (flock) and writes; the second waits for it and then
reads the file (after LOCK_WAIT_S it stops waiting and tokenises for itself). Files are written to a unique
temporary name and renamed, so a reader sees a whole file or none. A file is trusted only when it is ours (this
user's, not writable by others), names this key and format, and its body matches the SHA-256 in its header;
anything else is ignored and written again. Deleting the folder is always safe.
"""

from __future__ import annotations

import datetime
import fcntl
import hashlib
import importlib
import importlib.metadata
import json
import os
import sys
import tempfile
import time
from array import array
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

from .. import __version__
from ..core.adapter_shape import hub_id
from ..core.data import load_dataset
from ..core.encoding import bio_label_names
from ..core.paths import read_own_file
from .batching import Example, encode_samples

FORMAT_VERSION = 2  # 2: the header holds the tokenizer's special ids (TokenizerFacts)
MAGIC = b"gputwin-tokens\n"
SUFFIX = ".tokens"
LOCK_WAIT_S = 300.0  # how long an arm waits for another that is writing the same key
MAX_HEADER_BYTES = 1 << 20
MAX_HASHED_FILE_BYTES = 256 << 20  # a bigger file in a model folder is a weight: its size and mtime stand in
# Files in a model folder that never change how text is tokenised (hashing gigabytes of weights would cost
# more than the tokenising it saves).
WEIGHT_SUFFIXES = frozenset({".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx",
                             ".gguf", ".ot", ".tflite", ".npz", ".npy"})
TEMPLATE_FOLDERS = ("additional_chat_templates",)  # subfolders transformers reads chat templates from
# The modules whose code turns a data file into token ids: an edit to any of them changes the key.
CODE_MODULES = ("gputwin.core.encoding", "gputwin.core.data.formats", "gputwin.core.data.loading", "gputwin.core.data.records",
                "gputwin.train.batching", "gputwin.train.tokcache")
LIBRARIES = ("transformers", "tokenizers", "sentencepiece", "jinja2")

HIT = "hit"            # read from the cache
WRITTEN = "written"    # tokenised here and saved
REBUILT = "rebuilt"    # a file under this key was damaged or not ours: tokenised and saved again
UNSAVED = "unsaved"    # tokenised here, but the file could not be saved (the folder is not writable, ...)
OFF = "off"            # no key: the tokenizer's files are not in a folder on this machine


@dataclass(frozen=True)
class TokenizerFacts:
    """What training needs of the tokenizer (collation pads with pad_token_id); the rest is for reports."""

    pad_token_id: int
    eos_token_id: int | None
    bos_token_id: int | None
    vocab_size: int | None  # len(tokenizer): the base vocabulary and the added tokens

    @classmethod
    def of(cls, tokenizer: Any) -> TokenizerFacts | None:
        """Read from a loaded tokenizer; None when it has no integer pad id."""
        def number(name: str) -> int | None:
            value = getattr(tokenizer, name, None)
            return value if isinstance(value, int) and not isinstance(value, bool) else None

        pad = number("pad_token_id")
        if pad is None:
            return None
        try:
            size: int | None = len(tokenizer)
        except TypeError:
            size = None
        return cls(pad, number("eos_token_id"), number("bos_token_id"), size)

    def to_dict(self) -> dict[str, int | None]:
        return {"pad_token_id": self.pad_token_id, "eos_token_id": self.eos_token_id,
                "bos_token_id": self.bos_token_id, "vocab_size": self.vocab_size}

    @classmethod
    def from_dict(cls, raw: Any) -> TokenizerFacts | None:
        """None for anything but the dict to_dict writes."""
        if not isinstance(raw, dict):
            return None
        values = [raw.get(k) for k in ("pad_token_id", "eos_token_id", "bos_token_id", "vocab_size")]
        if not isinstance(values[0], int) or not all(v is None or isinstance(v, int) for v in values) \
                or any(isinstance(v, bool) for v in values):
            return None
        return cls(*values)


@dataclass(frozen=True)
class TrainingData:
    """What the trainer needs from its data file; `cache` says how it was got (HIT, WRITTEN, ...);
    `tokenizer` the tokenizer's special ids, when known (always, for data tokenised here or read from the cache
    written by this version)."""

    examples: list[Example]
    label_names: list[str] | None
    bad_lines: int
    cache: str
    tokenizer: TokenizerFacts | None = None


def cache_folder(logs_root: Path) -> Path:
    """Shared by every experiment under the same logs root."""
    return logs_root / ".cache" / "tokenized"


def load_training_data(train_file: str | Path, tokenizer: Any, *, base: str, task: str, max_length: int,
                       trust_remote_code: bool = False, folder: Path | None = None,
                       wait_s: float = LOCK_WAIT_S) -> TrainingData:
    """The examples of `train_file` for `tokenizer` (loaded from `base`), through the cache in `folder`.

    Never fails because of the cache: a cache that cannot be read or written costs only the tokenising."""
    data_digest, key = _digest_and_key(train_file, base, task=task, max_length=max_length,
                                       trust_remote_code=trust_remote_code, folder=folder)
    if folder is None or key is None:
        return _tokenise(train_file, tokenizer, task, max_length, OFF)
    path = folder / f"{key}{SUFFIX}"
    found = read_entry(path, key)
    if found is not None:
        return found
    try:
        _make_private(folder)
    except OSError:
        return _tokenise(train_file, tokenizer, task, max_length, UNSAVED)
    with _locked(path.with_suffix(".lock"), wait_s):
        found = read_entry(path, key)  # another arm wrote it while this one waited
        if found is not None:
            return found
        data = _tokenise(train_file, tokenizer, task, max_length, REBUILT if path.exists() else WRITTEN)
        if _file_digest(Path(train_file).expanduser()) != data_digest:
            return replace(data, cache=UNSAVED)  # the file changed while it was read: the key no longer fits
        try:
            write_entry(path, key, data, task=task, max_length=max_length)
        except OSError:
            return replace(data, cache=UNSAVED)
        return data


def lookup(train_file: str | Path, *, base: str, task: str, max_length: int, trust_remote_code: bool = False,
           folder: Path | None = None) -> TrainingData | None:
    """What load_training_data would read from the cache (status HIT), without a tokenizer and without waiting
    for an arm that is writing it; None when the cache does not hold it (yet). Never raises."""
    _, key = _digest_and_key(train_file, base, task=task, max_length=max_length,
                             trust_remote_code=trust_remote_code, folder=folder)
    return None if folder is None or key is None else read_entry(folder / f"{key}{SUFFIX}", key)


def _digest_and_key(train_file: str | Path, base: str, *, task: str, max_length: int, trust_remote_code: bool,
                    folder: Path | None) -> tuple[str | None, str | None]:
    """SHA-256 of the data file and the cache key; the key is None without a folder or anything to key on."""
    data_digest = _file_digest(Path(train_file).expanduser())
    material = None if folder is None or data_digest is None else key_material(
        data_digest, base, task=task, max_length=max_length, trust_remote_code=trust_remote_code)
    return data_digest, None if material is None else _hash(material)


def _tokenise(train_file: str | Path, tokenizer: Any, task: str, max_length: int, status: str) -> TrainingData:
    dataset = load_dataset(train_file)
    label_names = bio_label_names(dataset.entity_types) if task == "tag" else None
    examples = encode_samples(dataset.samples, tokenizer, task=task, max_length=max_length, label_names=label_names)
    return TrainingData(examples, label_names, len(dataset.bad_lines), status, TokenizerFacts.of(tokenizer))


# ---------------------------------------------------------------- the key


def cache_key(train_file: str | Path, base: str, *, task: str, max_length: int,
              trust_remote_code: bool = False) -> str | None:
    """SHA-256 (hex) of everything that determines the examples; None when the data file cannot be read (its
    loader will say why) or the tokenizer's files are not in a folder on this machine (nothing is cached)."""
    data_digest = _file_digest(Path(train_file).expanduser())
    if data_digest is None:
        return None
    material = key_material(data_digest, base, task=task, max_length=max_length, trust_remote_code=trust_remote_code)
    return None if material is None else _hash(material)


def key_material(data_digest: str, base: str, *, task: str, max_length: int,
                 trust_remote_code: bool) -> dict[str, Any] | None:
    """What the key hashes; None when the tokenizer's folder cannot be found or read."""
    folder = tokenizer_folder(base)
    tokenizer = _folder_digest(folder) if folder is not None else None
    if tokenizer is None:
        return None
    return {"format": FORMAT_VERSION, "code": code_digest(), "libraries": library_versions(), "data": data_digest,
            "tokenizer": tokenizer, "task": task, "max_length": int(max_length),
            "trust_remote_code": bool(trust_remote_code), "date": _template_date(folder)}  # type: ignore[arg-type]


def _template_date(folder: Path) -> str | None:
    """Today's date where the tokenizer's chat template writes it into the prompt (`strftime_now`, as Llama 3.1's
    does): the same samples tokenise otherwise tomorrow. None for a template that does not."""
    files = [folder / name for name in ("tokenizer_config.json", "chat_template.jinja", "chat_template.json")]
    for sub in TEMPLATE_FOLDERS:
        if (folder / sub).is_dir():
            files += sorted((folder / sub).iterdir())
    for path in files:
        try:
            if path.is_file() and b"strftime_now" in path.read_bytes():
                return datetime.date.today().isoformat()
        except OSError:
            continue
    return None


def _hash(material: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()


def tokenizer_folder(base: str) -> Path | None:
    """The folder the tokenizer of `base` loads from: the folder itself, or a hub id's snapshot in the local
    Hugging Face cache (what from_pretrained(local_files_only=True) reads)."""
    folder = Path(base).expanduser()
    if folder.is_dir():
        return folder.resolve()
    identity = hub_id(base)
    if identity is None:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    for name in ("tokenizer_config.json", "tokenizer.json", "config.json"):
        try:
            cached = try_to_load_from_cache(identity, name)
        except ValueError:
            return None
        if isinstance(cached, str):
            return Path(cached).parent
    return None


def _file_digest(path: Path) -> str | None:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
    except OSError:
        return None
    return digest.hexdigest()


def _folder_digest(folder: Path) -> str | None:
    """Names, sizes and contents of the folder's files (weights by size and mtime only), in name order."""
    try:
        files = [p for p in folder.iterdir() if p.is_file()]
        for sub in TEMPLATE_FOLDERS:
            if (folder / sub).is_dir():
                files += [p for p in (folder / sub).iterdir() if p.is_file()]
        digest = hashlib.sha256()
        for path in sorted(files, key=lambda p: p.relative_to(folder).as_posix()):
            name = path.relative_to(folder).as_posix()
            info = path.stat()
            if path.name.startswith(".") or path.suffix.lower() in WEIGHT_SUFFIXES:
                continue
            if info.st_size > MAX_HASHED_FILE_BYTES:
                content = f"size {info.st_size} mtime {info.st_mtime_ns}"
            else:
                content = _file_digest(path) or "unreadable"
            digest.update(f"{name}\0{info.st_size}\0{content}\n".encode())
        return digest.hexdigest()
    except OSError:
        return None


@lru_cache(maxsize=1)
def code_digest() -> str:
    """SHA-256 of the source of CODE_MODULES (gputwin's version where a module has no source file)."""
    digest = hashlib.sha256()
    for name in CODE_MODULES:
        module = importlib.import_module(name)
        source = getattr(module, "__file__", None)
        try:
            digest.update(Path(source).read_bytes() if source else __version__.encode())
        except OSError:
            digest.update(f"{name} {__version__}".encode())
    return digest.hexdigest()


@lru_cache(maxsize=1)
def library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


# ---------------------------------------------------------------- the file

# MAGIC, 8 bytes of header length (little-endian), the header (JSON), then the body: per sample its length
# (int32) and truncated flag (1 byte), then every input id and every label (int32), sample after sample.


def write_entry(path: Path, key: str, data: TrainingData, *, task: str, max_length: int) -> None:
    """Save `data` under `key` at `path`: a unique temporary file renamed over it (mode 0600)."""
    entry = entry_bytes(key, data, task=task, max_length=max_length)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(entry)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def entry_bytes(key: str, data: TrainingData, *, task: str, max_length: int) -> bytes:
    """What write_entry writes: MAGIC, the header's length, the header, the body."""
    lengths = array("i", (e.n_tokens for e in data.examples))
    truncated = bytes(int(e.truncated) for e in data.examples)
    ids, labels = array("i"), array("i")
    for e in data.examples:
        ids.extend(e.input_ids)
        labels.extend(e.labels)
    body = lengths.tobytes() + truncated + ids.tobytes() + labels.tobytes()
    header = {"format": FORMAT_VERSION, "key": key, "gputwin": __version__, "task": task, "max_length": max_length,
              "samples": len(data.examples), "tokens": len(ids), "label_names": data.label_names,
              "bad_lines": data.bad_lines, "tokenizer": data.tokenizer.to_dict() if data.tokenizer else None,
              "itemsize": ids.itemsize, "byteorder": sys.byteorder,
              "body_sha256": hashlib.sha256(body).hexdigest(), "written": round(time.time(), 3)}
    head = json.dumps(header).encode()
    return MAGIC + len(head).to_bytes(8, "little") + head + body


def read_entry(path: Path, key: str) -> TrainingData | None:
    """The data saved at `path` when it is ours, whole and under `key` (status HIT); None otherwise. Never raises."""
    try:
        raw = read_own_file(path)
        return None if raw is None else _parse(raw, key)
    except (OSError, ValueError, TypeError, KeyError, OverflowError):
        return None


def _parse(raw: bytes, key: str) -> TrainingData | None:
    if not raw.startswith(MAGIC):
        return None
    at = len(MAGIC)
    size = int.from_bytes(raw[at:at + 8], "little")
    if size > MAX_HEADER_BYTES:
        return None
    header = json.loads(raw[at + 8:at + 8 + size])
    body = memoryview(raw)[at + 8 + size:]
    n, tokens = header["samples"], header["tokens"]
    if (header.get("format") != FORMAT_VERSION or header.get("key") != key or header.get("itemsize") != 4
            or header.get("byteorder") != sys.byteorder or not isinstance(n, int) or not isinstance(tokens, int)
            or len(body) != 4 * n + n + 8 * tokens or hashlib.sha256(body).hexdigest() != header.get("body_sha256")):
        return None
    lengths, ids, labels = array("i"), array("i"), array("i")
    lengths.frombytes(body[:4 * n])
    truncated = body[4 * n:5 * n]
    ids.frombytes(body[5 * n:5 * n + 4 * tokens])
    labels.frombytes(body[5 * n + 4 * tokens:])
    if sum(lengths) != tokens or min(lengths, default=0) < 0:
        return None
    examples, start = [], 0
    for length, cut in zip(lengths, truncated):
        examples.append(Example(ids[start:start + length].tolist(), labels[start:start + length].tolist(), bool(cut)))
        start += length
    label_names = header.get("label_names")
    if label_names is not None and not (isinstance(label_names, list) and all(isinstance(x, str) for x in label_names)):
        return None
    return TrainingData(examples, label_names, int(header.get("bad_lines", 0)), HIT,
                        TokenizerFacts.from_dict(header.get("tokenizer")))


# ---------------------------------------------------------------- between processes
# The data of one or more files, as a fork of the trainer that tokenised them hands them back
# (gputwin.train.background.in_child): per file its cache status, a newline, its entry's length (8 bytes,
# little-endian) and the entry (entry_bytes, checked by its SHA-256 as a cache file is).

WIRE_KEY = "wire"


def to_wire(datas: list[TrainingData]) -> bytes:
    parts = []
    for data in datas:
        entry = entry_bytes(WIRE_KEY, data, task="", max_length=0)
        parts.append(data.cache.encode() + b"\n" + len(entry).to_bytes(8, "little") + entry)
    return b"".join(parts)


def from_wire(raw: bytes) -> list[TrainingData]:
    """What to_wire sent, each with its status; ValueError for anything else."""
    datas, at = [], 0
    while at < len(raw):
        end = raw.index(b"\n", at)
        status = raw[at:end].decode()
        size = int.from_bytes(raw[end + 1:end + 9], "little")
        data = _parse(raw[end + 9:end + 9 + size], WIRE_KEY) if end + 9 + size <= len(raw) else None
        if status not in (HIT, WRITTEN, REBUILT, UNSAVED, OFF) or data is None:
            raise ValueError("not the tokenised data of a gputwin trainer")
        datas.append(replace(data, cache=status))
        at = end + 9 + size
    return datas


# ---------------------------------------------------------------- folder and lock


def _make_private(folder: Path) -> None:
    """logs/.cache and logs/.cache/tokenized, 0700 (the files hold the training text as token ids)."""
    for part in (folder.parent, folder):
        part.mkdir(parents=True, exist_ok=True)
        os.chmod(part, 0o700)


@contextmanager
def _locked(lock: Path, wait_s: float) -> Iterator[bool]:
    """Hold `lock` (an flock, let go when this process ends however it ends) for the block; yields False when
    another process held it for longer than wait_s (the block then runs without it: writes stay atomic)."""
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError:
        yield False
        return
    try:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                held = True
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    held = False
                    break
                time.sleep(0.05)
        yield held
    finally:
        os.close(fd)

