"""Sources -> validated, normalized conversations -> Parquet shards + a manifest.

Every record is normalized to one schema, ``messages: [{role, content, train}]``, from any of::

    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    {"prompt": "hi", "completion": "hello"}
    {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}

A bad record never stops the others: it goes to ``rejects.jsonl`` with its source, line (or
row) and reason, and is counted by reason. Exact duplicates are dropped and counted. The
train/eval split is decided by a hash of each conversation's content, so a conversation
stays on its side when data is appended::

    >>> split_of("5f2b" + "0" * 60, eval_fraction=0.05)   # depends only on the id
    'train'

Sources (``data.sources``, each a URI with an optional ``weight``): ``builtin:catalog``; JSONL
(optionally ``.gz``) on a local path or ``s3://``; a Parquet file, or a folder / ``s3://``
prefix of Parquet files; a folder or ``s3://`` prefix written by ``datasets``' ``save_to_disk``.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import math
import re
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq

from steps import storage
from steps.config import Recipe
from steps.storage import require_local, subdir

ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "tool": "tool", "function": "tool"}
SPLITS = ("train", "eval")

MESSAGE_TYPE = pa.struct([("role", pa.string()), ("content", pa.string()), ("train", pa.bool_())])
DATA_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("messages", pa.list_(MESSAGE_TYPE)),
    ("meta", pa.string()),
    ("source", pa.string()),
])


class InvalidRecord(ValueError):
    """A record that cannot be trained on; the message is the reject reason."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class TooManyRejects(RuntimeError):
    """The share of invalid records is above ``data.max_reject_fraction``."""


class EmptySource(RuntimeError):
    """A data source that yielded no record at all (a typo in a path, a folder of other files, an
    empty prefix); a source may allow it with ``allow_empty: true``."""


@dataclass(frozen=True, slots=True)
class RawRecord:
    source: str
    """The source URI the record came from."""
    position: int
    """1-based line number (JSONL) or 0-based row number (Parquet, generated data)."""
    value: object
    """The parsed record, or an ``InvalidRecord`` if it could not even be parsed."""


def _message(role: object, content: object, train: object, index: int) -> dict:
    if role not in ROLES:
        raise InvalidRecord("unknown_role", f"message {index} has role {role!r}")
    if not isinstance(content, str):
        raise InvalidRecord("non_string_content", f"message {index} content is {type(content).__name__}")
    if not content.strip():
        raise InvalidRecord("empty_content", f"message {index} is empty")
    if not isinstance(train, bool):
        raise InvalidRecord("bad_train_flag", f"message {index} has train={train!r}")
    return {"role": role, "content": content, "train": train}


def _train_flag(message: dict) -> object:
    """A message's ``train`` flag: True where it is missing (or null, as in Parquet rows)."""
    train = message.get("train")
    return True if train is None else train


def normalize_record(record: object) -> list[dict]:
    """Return the record's conversation as ``[{role, content, train}]`` or raise ``InvalidRecord``."""
    if not isinstance(record, dict):
        raise InvalidRecord("not_an_object", type(record).__name__)
    # Parquet and datasets rows have every column of the file, None where a record lacks it.
    if record.get("messages") is not None:
        raw = record["messages"]
        if not isinstance(raw, list):
            raise InvalidRecord("bad_messages", "'messages' is not a list")
        messages = []
        for i, m in enumerate(raw):
            if not isinstance(m, dict):
                raise InvalidRecord("bad_messages", f"message {i} is not an object")
            messages.append(_message(m.get("role"), m.get("content"), _train_flag(m), i))
    elif record.get("conversations") is not None:
        raw = record["conversations"]
        if not isinstance(raw, list):
            raise InvalidRecord("bad_messages", "'conversations' is not a list")
        messages = []
        for i, m in enumerate(raw):
            if not isinstance(m, dict):
                raise InvalidRecord("bad_messages", f"turn {i} is not an object")
            role = SHAREGPT_ROLES.get(m.get("from"), m.get("from"))
            messages.append(_message(role, m.get("value"), _train_flag(m), i))
    elif record.get("prompt") is not None and record.get("completion") is not None:
        messages = [_message("user", record["prompt"], True, 0),
                    _message("assistant", record["completion"], True, 1)]
    else:
        raise InvalidRecord("unknown_shape", "expected 'messages', 'conversations' or 'prompt'+'completion'")
    if not any(m["role"] == "assistant" for m in messages):
        raise InvalidRecord("no_assistant_turn")
    if messages[-1]["role"] != "assistant":
        raise InvalidRecord("ends_without_assistant", f"last turn is {messages[-1]['role']!r}")
    if not any(m["role"] == "assistant" and m["train"] for m in messages):
        raise InvalidRecord("no_trained_turn", "every assistant turn has train=false")
    return messages


def conversation_id(messages: list[dict]) -> str:
    """sha256 of the normalized conversation: equal content, equal id, wherever it came from."""
    canonical = json.dumps([[m["role"], m["content"], m["train"]] for m in messages],
                           ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def split_of(record_id: str, eval_fraction: float) -> str:
    """``eval`` for a fixed ``eval_fraction`` share of ids, ``train`` otherwise; depends only on the id."""
    bucket = int(record_id[:16], 16) / float(1 << 64)
    return "eval" if bucket < eval_fraction else "train"


# Bytes read from a source per call: bounds the memory of line splitting.
READ_CHUNK_BYTES = 1 << 20


# A run of blank (whitespace-only) lines: skipped by one C-level regex match, not line by line,
# so a file of millions of blank lines (a small .gz can hold them) costs next to nothing.
_BLANK_LINES = re.compile(rb"(?:[ \t\r\f\v]*\n)+")


def _lines(stream: BinaryIO, max_line_bytes: int) -> Iterator[tuple[int, bytes | None]]:
    """``(line number, line)`` for the non-blank lines of a byte stream, without their newline;
    the line is ``None`` when it is over ``max_line_bytes``.

    An over-long line is skipped as it streams by (never held whole), so one huge record cannot
    take the memory; blank lines are counted, never yielded::

        >>> import io
        >>> list(_lines(io.BytesIO(b'{"a": 1}\\n\\n  \\n' + b"x" * 50 + b"\\n{}"), max_line_bytes=20))
        [(1, b'{"a": 1}'), (4, None), (5, b'{}')]
    """
    pending = bytearray()
    oversize = False
    line_number = 1
    while chunk := stream.read(READ_CHUNK_BYTES):
        start = 0
        while True:
            if not pending and not oversize and (blanks := _BLANK_LINES.match(chunk, start)):
                line_number += chunk.count(b"\n", start, blanks.end())
                start = blanks.end()
            newline = chunk.find(b"\n", start)
            if newline == -1:
                break
            if not oversize:
                pending += chunk[start:newline]
            if oversize or pending.strip():
                yield line_number, None if oversize or len(pending) > max_line_bytes else bytes(pending)
            pending.clear()
            oversize = False
            line_number += 1
            start = newline + 1
        if not oversize:
            pending += chunk[start:]
            if len(pending) > max_line_bytes:
                oversize = True
                pending.clear()
    if oversize or pending.strip():
        yield line_number, None if oversize else bytes(pending)


def _read_jsonl(uri: str, max_record_bytes: int) -> Iterator[RawRecord]:
    """Records of a local or ``s3://`` JSONL file (gzip if the name ends in ``.gz``), streamed."""
    with contextlib.ExitStack() as stack:
        stream = stack.enter_context(storage.open_read(uri))
        if uri.endswith(".gz"):
            stream = stack.enter_context(gzip.GzipFile(fileobj=stream, mode="rb"))
        for line_number, raw in _lines(stream, max_record_bytes):
            if raw is None:
                yield RawRecord(uri, line_number, InvalidRecord("oversize", f"line over {max_record_bytes} bytes"))
                continue
            yield RawRecord(uri, line_number, parse_json_line(raw, first=line_number == 1))


def parse_json_line(raw: bytes, *, first: bool = False) -> object:
    """One JSONL line -> its value, or an :class:`InvalidRecord` that says why not.

    Each way a line can be hostile is its own reject reason, and never an exception that stops
    the ingest: bytes that are not UTF-8, bad JSON, lone surrogate escapes (``"\\ud800"``, which no
    UTF-8 text can hold), numbers with thousands of digits, and nesting too deep to process. A
    UTF-8 byte-order mark at the start of a file's first line is ignored.

        >>> parse_json_line(b'{"a": [1, 2.5]}')
        {'a': [1, 2.5]}
        >>> [parse_json_line(line).reason for line in (b'{"a": "\\\\ud800"}', b"[" * 100_000, b"1" * 5000, b"{")]
        ['invalid_unicode', 'too_deeply_nested', 'number_too_long', 'malformed_json']
    """
    try:
        text = raw.decode("utf-8-sig" if first else "utf-8")
    except UnicodeDecodeError as err:
        return InvalidRecord("invalid_utf8", str(err))
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        return InvalidRecord("malformed_json", str(err))
    except RecursionError:
        return InvalidRecord("too_deeply_nested", "nesting too deep to read")
    except ValueError as err:  # "Exceeds the limit (4300 digits) for integer string conversion"
        return InvalidRecord("number_too_long", str(err)[:120])
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return InvalidRecord("invalid_unicode", "a string holds a lone surrogate escape (\\ud800-\\udfff)")
    except RecursionError:
        return InvalidRecord("too_deeply_nested", "nesting too deep to process")
    return value


def _read_parquet(uri: str) -> Iterator[RawRecord]:
    """Rows of a Parquet file or a folder (prefix) of them, 4096 rows at a time.

    An ``s3://`` file is downloaded to a temporary file first (Parquet needs seeks), one file
    at a time, and deleted once read.
    """
    files = [f for f in storage.list_files(uri) if f.endswith(".parquet")]
    row = 0
    for file in files:
        with tempfile.TemporaryDirectory(prefix="posttrain-ingest-") as scratch:
            local = storage.download_file(file, Path(scratch) / "part.parquet") if storage.is_s3(file) else file
            for batch in pq.ParquetFile(local).iter_batches(batch_size=4096):
                for record in batch.to_pylist():
                    yield RawRecord(uri, row, record)
                    row += 1


_DATASETS_MARKERS = ("state.json", "dataset_dict.json")  # what save_to_disk writes for a Dataset / DatasetDict


def _is_datasets_folder(uri: str) -> bool:
    """Was ``uri`` (a local folder or an ``s3://`` prefix) written by ``datasets``' ``save_to_disk``?"""
    if storage.is_s3(uri):
        return any(storage.exists(storage.join(uri, name)) for name in _DATASETS_MARKERS)
    folder = Path(uri)
    return folder.is_dir() and any((folder / name).exists() for name in _DATASETS_MARKERS)


def _read_datasets_folder(uri: str) -> Iterator[RawRecord]:
    """Rows of a folder written by ``datasets``' ``save_to_disk`` (a Dataset, or every split of a DatasetDict).

    The Arrow files are memory-mapped, so iterating does not load the dataset into memory.
    """
    import datasets

    if storage.is_s3(uri):
        yield from _read_s3_datasets_folder(uri)
        return
    loaded = datasets.load_from_disk(uri)
    parts = [loaded[name] for name in sorted(loaded)] if isinstance(loaded, datasets.DatasetDict) else [loaded]
    row = 0
    for part in parts:
        for record in part:
            yield RawRecord(uri, row, record)
            row += 1


def _read_s3_datasets_folder(uri: str) -> Iterator[RawRecord]:
    """:func:`_read_datasets_folder` of an ``s3://`` prefix, one Arrow file on local disk at a time.

    The same rows in the same order as the folder read locally: splits sorted by name
    (``dataset_dict.json``), each split's files in the order of its ``state.json``, each file
    read with the features ``datasets`` stored in it. A file is downloaded to a temporary
    folder, memory-mapped while its rows are read, and deleted before the next one comes.
    """
    import datasets

    if storage.exists(storage.join(uri, "dataset_dict.json")):
        splits = json.loads(storage.read_bytes(storage.join(uri, "dataset_dict.json")))["splits"]
        parts = [storage.join(uri, split) for split in sorted(splits)]
    else:
        parts = [uri]
    row = 0
    for part in parts:
        state = json.loads(storage.read_bytes(storage.join(part, "state.json")))
        for data_file in state["_data_files"]:
            with tempfile.TemporaryDirectory(prefix="posttrain-ingest-") as scratch:
                local = storage.download_file(storage.join(part, data_file["filename"]), Path(scratch) / "data.arrow")
                for record in datasets.Dataset.from_file(str(local)):
                    yield RawRecord(uri, row, record)
                    row += 1


def read_source(uri: str, recipe: Recipe) -> Iterator[RawRecord]:
    """Yield the raw records of one source, in a deterministic order."""
    if not uri.startswith("builtin:") and not storage.is_s3(uri) and not Path(uri).exists():
        raise EmptySource(f"data source {uri!r} does not exist (a relative path is read from {Path.cwd()})")
    if uri.startswith("builtin:"):
        from steps.builtin import builtin_dataset

        records = builtin_dataset(uri[len("builtin:"):], recipe.data.builtin_num_conversations, recipe.seed)
        for row, record in enumerate(records):
            yield RawRecord(uri, row, record)
    elif uri.endswith((".jsonl", ".jsonl.gz", ".json", ".json.gz")):
        yield from _read_jsonl(uri, recipe.data.max_record_bytes)
    elif _is_datasets_folder(uri):
        yield from _read_datasets_folder(uri)
    elif uri.endswith(".parquet") or storage.is_s3(uri) or Path(uri).is_dir():
        yield from _read_parquet(uri)
    else:
        raise ValueError(f"data source {uri!r}: unknown format (expected builtin:NAME, .jsonl[.gz], .parquet, "
                         "a folder or s3:// prefix of Parquet files, or a folder saved by datasets)")


def num_copies(record_id: str, weight: float) -> int:
    """How many times a conversation of a source with ``weight`` is taken: ``floor(weight)``, plus one
    more for a ``weight - floor(weight)`` share of conversations chosen by a hash of their id.

        >>> num_copies("0" * 64, 2.0), num_copies("0" * 64, 0.5), num_copies("f" * 64, 0.5)
        (2, 1, 0)
    """
    whole = math.floor(weight)
    # Not the bits split_of uses: which half of a source is kept must not depend on the split.
    share = int(record_id[16:32], 16) / float(1 << 64)
    return whole + (1 if share < weight - whole else 0)


@dataclass(frozen=True, slots=True)
class RecordFormat:
    """What a data row is: ingest reads, rejects, dedupes, splits and shards any format alike.

    The default, :data:`CONVERSATIONS`, is SFT's ``messages``; ``steps.dpo.PAIRS`` is a
    preference pair (``prompt``, ``chosen``, ``rejected``).
    """

    schema: pa.Schema
    """Columns of the data shards: ``id``, ``meta`` and ``source`` plus the content columns."""
    normalize: Callable[[object], dict]
    """A raw record -> its content columns (e.g. ``{"messages": [...]}``); raises ``InvalidRecord``."""
    record_id: Callable[[dict], str]
    """The content columns -> the id that dedupes (and decides the split unless ``split_key`` is set)."""
    split_key: Callable[[dict], str] | None = None
    """The content columns -> a hex digest that decides the split, where records sharing it must
    stay together (preference pairs: the prompt, so no prompt is trained on and held out)."""


CONVERSATIONS = RecordFormat(schema=DATA_SCHEMA, normalize=lambda record: {"messages": normalize_record(record)},
                             record_id=lambda content: conversation_id(content["messages"]))


class _ShardWriter:
    """Writes rows to ``part-NNNNN.parquet`` files of at most ``rows_per_shard`` rows."""

    def __init__(self, folder: Path, rows_per_shard: int, schema: pa.Schema = DATA_SCHEMA):
        self.folder, self.rows_per_shard, self.schema = folder, rows_per_shard, schema
        self.buffer: list[dict] = []
        self.uris: list[str] = []
        self.num_rows = 0

    def add(self, row: dict) -> None:
        self.buffer.append(row)
        if len(self.buffer) >= self.rows_per_shard:
            self.flush()

    def flush(self) -> None:
        if not self.buffer and self.uris:
            return
        path = self.folder / f"part-{len(self.uris):05d}.parquet"
        pq.write_table(pa.Table.from_pylist(self.buffer, schema=self.schema), path)
        self.uris.append(str(path))
        self.num_rows += len(self.buffer)
        self.buffer = []


class _Fingerprint:
    """An order-independent fingerprint of a multiset of ids, in constant memory.

    The sum modulo 2**256 of the ids read as numbers, hashed: the same ids (with the same
    repeats) in any order give the same value; one more id or one more copy changes it.
    """

    def __init__(self):
        self._sum = 0
        self.count = 0

    def add(self, record_id: str) -> None:
        self._sum = (self._sum + int(record_id, 16)) % (1 << 256)
        self.count += 1

    def hexdigest(self) -> str:
        return hashlib.sha256(f"{self.count}:{self._sum:064x}".encode()).hexdigest()


def ingest(recipe: Recipe, run_root: str, record_format: RecordFormat = CONVERSATIONS) -> dict:
    """Read every source, validate, dedupe, weight, split, and write shards; return the manifest.

    Writes ``data/{train,eval}/part-NNNNN.parquet`` and ``data/rejects.jsonl`` under ``run_root``.
    ``record_format`` says what a row is (SFT conversations by default; see :class:`RecordFormat`).
    Sources are streamed (JSONL line by line, Parquet and ``datasets`` folders in batches), so
    memory is one shard of rows per split plus the set of seen ids used for dedup: 64-character
    hex ids, about 130 bytes each in a Python set, so 1M conversations take ~130 MB. A
    conversation that appears in several sources is kept once, with the weight of the first.

    Source weights repeat records (see :func:`num_copies`): 2.0 writes each conversation twice,
    0.5 keeps a hash-chosen half. Copies have the same id, so they land in the same split, and
    they are not counted as duplicates. The eval split takes one copy of each conversation,
    whatever its weight, and none of a conversation whose weight left it out.

    Returns:
        The manifest: ``sources`` (per source: ``uri``, ``weight``, ``num_read``,
        ``num_conversations`` taken after weighting), ``splits`` (``uris``,
        ``num_conversations`` rows, ``fingerprint``), ``num_records_read``, ``num_valid``
        (distinct valid conversations), ``num_duplicates``, ``num_weighted_out`` (left out by
        a weight below 1), ``num_weighted_copies`` (extra copies from weights above 1),
        ``num_rejected``, ``reject_reasons``, ``rejects_uri``, ``fingerprint``.
    """
    data_dir = subdir(run_root, "data")
    writers = {s: _ShardWriter(subdir(run_root, "data", s), recipe.data.records_per_shard, record_format.schema)
               for s in SPLITS}
    seen: set[str] = set()
    fingerprints = {s: _Fingerprint() for s in SPLITS}
    reasons: Counter[str] = Counter()
    num_read = num_duplicates = num_weighted_out = num_weighted_copies = 0
    source_stats = []
    rejects_path = data_dir / "rejects.jsonl"
    with open(rejects_path, "w", encoding="utf-8") as rejects:
        for source in recipe.data.sources:
            stats = {"uri": source.uri, "weight": source.weight, "num_read": 0, "num_conversations": 0}
            source_stats.append(stats)
            for raw in read_source(source.uri, recipe):
                num_read += 1
                stats["num_read"] += 1
                try:
                    if isinstance(raw.value, InvalidRecord):
                        raise raw.value
                    size = len(json.dumps(raw.value, ensure_ascii=False, default=str).encode("utf-8"))
                    if size > recipe.data.max_record_bytes:
                        raise InvalidRecord("oversize", f"{size} bytes > {recipe.data.max_record_bytes}")
                    content = record_format.normalize(raw.value)
                except InvalidRecord as err:
                    reasons[err.reason] += 1
                    rejects.write(json.dumps({"source": raw.source, "position": raw.position,
                                              "reason": err.reason, "detail": str(err)}) + "\n")
                    continue
                record_id = record_format.record_id(content)
                if record_id in seen:
                    num_duplicates += 1
                    continue
                seen.add(record_id)
                copies = num_copies(record_id, source.weight)
                split_key = record_format.split_key(content) if record_format.split_key else record_id
                split = split_of(split_key, recipe.data.eval_fraction)
                if copies == 0:
                    num_weighted_out += 1
                    continue
                if split == "eval":
                    copies = 1  # eval measures each conversation once
                num_weighted_copies += copies - 1
                row = {"id": record_id, **content, "source": raw.source,
                       "meta": json.dumps(raw.value.get("meta") or {}, ensure_ascii=False, sort_keys=True,
                                          default=str)}
                for _ in range(copies):
                    fingerprints[split].add(record_id)
                    writers[split].add(row)
                stats["num_conversations"] += copies
            if stats["num_read"] == 0 and not source.allow_empty:
                raise EmptySource(
                    f"data source {source.uri!r} yielded no records: a typo in the path, a folder or prefix "
                    "without .jsonl[.gz]/.parquet files, or an empty file? (set allow_empty: true on the "
                    "source if it may be empty)")
    for writer in writers.values():
        writer.flush()

    num_rejected = sum(reasons.values())
    reject_fraction = num_rejected / max(num_read, 1)
    if reject_fraction > recipe.data.max_reject_fraction:
        top = ", ".join(f"{r}: {n}" for r, n in reasons.most_common(5))
        raise TooManyRejects(
            f"{num_rejected} of {num_read} records ({reject_fraction:.1%}) were rejected, above "
            f"data.max_reject_fraction={recipe.data.max_reject_fraction:.1%} ({top}); see {rejects_path}")
    if writers["train"].num_rows == 0 or writers["eval"].num_rows == 0:
        raise ValueError(f"ingest produced {writers['train'].num_rows} train and {writers['eval'].num_rows} "
                         "eval conversations; both splits need at least one (more data or another "
                         "data.eval_fraction)")
    return {
        "sources": source_stats,
        "splits": {s: {"uris": w.uris, "num_conversations": w.num_rows, "fingerprint": fingerprints[s].hexdigest()}
                   for s, w in writers.items()},
        "num_records_read": num_read,
        "num_valid": len(seen),
        "num_duplicates": num_duplicates,
        "num_weighted_out": num_weighted_out,
        "num_weighted_copies": num_weighted_copies,
        "num_rejected": num_rejected,
        "reject_reasons": dict(sorted(reasons.items())),
        "rejects_uri": str(rejects_path),
        # Of the content only (not of where it was read from): both splits, copies included.
        "fingerprint": hashlib.sha256(
            f"{fingerprints['train'].hexdigest()}:{fingerprints['eval'].hexdigest()}".encode()).hexdigest(),
    }


def read_conversations(uris: list[str], limit: int | None = None) -> Iterator[dict]:
    """Yield records ``{id, messages, meta (parsed), source}`` from data shards, in order."""
    count = 0
    for uri in uris:
        for batch in pq.ParquetFile(require_local(uri, "data shard")).iter_batches(batch_size=4096):
            for record in batch.to_pylist():
                if limit is not None and count >= limit:
                    return
                record["meta"] = json.loads(record["meta"] or "{}")
                yield record
                count += 1
