"""Sources -> validated, normalized conversations -> Parquet shards + a manifest.

Every record is normalized to one schema, ``messages: [{role, content, train}]``, from any of::

    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    {"prompt": "hi", "completion": "hello"}
    {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}

A bad record never stops the others: it goes to ``rejects.jsonl`` with its source, line (or
row) and reason, and is counted by reason. Exact duplicates are dropped and counted. The
train/eval split is decided by a hash of each conversation's content, so a conversation
stays on its side when data is appended::

    >>> split_of("5f2b...", eval_fraction=0.05)   # depends only on the id
    'train'
"""

from __future__ import annotations

import gzip
import hashlib
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from steps.config import Recipe, warn_ignored
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


def normalize_record(record: object) -> list[dict]:
    """Return the record's conversation as ``[{role, content, train}]`` or raise ``InvalidRecord``."""
    if not isinstance(record, dict):
        raise InvalidRecord("not_an_object", type(record).__name__)
    if "messages" in record:
        raw = record["messages"]
        if not isinstance(raw, list):
            raise InvalidRecord("bad_messages", "'messages' is not a list")
        messages = []
        for i, m in enumerate(raw):
            if not isinstance(m, dict):
                raise InvalidRecord("bad_messages", f"message {i} is not an object")
            messages.append(_message(m.get("role"), m.get("content"), m.get("train", True), i))
    elif "conversations" in record:
        raw = record["conversations"]
        if not isinstance(raw, list):
            raise InvalidRecord("bad_messages", "'conversations' is not a list")
        messages = []
        for i, m in enumerate(raw):
            if not isinstance(m, dict):
                raise InvalidRecord("bad_messages", f"turn {i} is not an object")
            role = SHAREGPT_ROLES.get(m.get("from"), m.get("from"))
            messages.append(_message(role, m.get("value"), m.get("train", True), i))
    elif "prompt" in record and "completion" in record:
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


def _read_jsonl(uri: str) -> Iterator[RawRecord]:
    path = require_local(uri, "JSONL source")
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as f:
        for line_number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                yield RawRecord(uri, line_number, InvalidRecord("invalid_utf8", str(err)))
                continue
            try:
                yield RawRecord(uri, line_number, json.loads(text))
            except json.JSONDecodeError as err:
                yield RawRecord(uri, line_number, InvalidRecord("malformed_json", str(err)))


def _read_parquet(uri: str) -> Iterator[RawRecord]:
    path = require_local(uri, "Parquet source")
    files = sorted(path.rglob("*.parquet")) if path.is_dir() else [path]
    row = 0
    for file in files:
        for batch in pq.ParquetFile(file).iter_batches(batch_size=4096):
            for record in batch.to_pylist():
                yield RawRecord(uri, row, record)
                row += 1


def read_source(uri: str, recipe: Recipe) -> Iterator[RawRecord]:
    """Yield the raw records of one source, in a deterministic order."""
    if uri.startswith("builtin:"):
        from steps.builtin import builtin_dataset

        records = builtin_dataset(uri[len("builtin:"):], recipe.data.builtin_num_conversations, recipe.seed)
        for row, record in enumerate(records):
            yield RawRecord(uri, row, record)
    elif uri.endswith((".jsonl", ".jsonl.gz", ".json", ".json.gz")):
        yield from _read_jsonl(uri)
    elif uri.endswith(".parquet") or require_local(uri, "source").is_dir():
        yield from _read_parquet(uri)
    else:
        raise ValueError(f"data source {uri!r}: unknown format (expected builtin:NAME, .jsonl[.gz], "
                         ".parquet or a folder of Parquet files)")


class _ShardWriter:
    """Writes rows to ``part-NNNNN.parquet`` files of at most ``rows_per_shard`` rows."""

    def __init__(self, folder: Path, rows_per_shard: int):
        self.folder, self.rows_per_shard = folder, rows_per_shard
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
        pq.write_table(pa.Table.from_pylist(self.buffer, schema=DATA_SCHEMA), path)
        self.uris.append(str(path))
        self.num_rows += len(self.buffer)
        self.buffer = []


def ingest(recipe: Recipe, run_root: str) -> dict:
    """Read every source, validate, dedupe, split, and write shards; return the manifest.

    Writes ``data/{train,eval}/part-NNNNN.parquet`` and ``data/rejects.jsonl`` under ``run_root``.
    Memory is bounded by one shard of rows per split plus the set of seen ids (for dedup).
    """
    data_dir = subdir(run_root, "data")
    writers = {s: _ShardWriter(subdir(run_root, "data", s), recipe.data.records_per_shard) for s in SPLITS}
    seen: set[str] = set()
    split_ids: dict[str, list[str]] = {s: [] for s in SPLITS}
    reasons: Counter[str] = Counter()
    num_read = num_duplicates = 0
    rejects_path = data_dir / "rejects.jsonl"
    with open(rejects_path, "w", encoding="utf-8") as rejects:
        for source in recipe.data.sources:
            if source.weight != 1.0:
                warn_ignored("data.sources[].weight", "source weighting is not implemented yet; "
                             "every record is taken once")
            for raw in read_source(source.uri, recipe):
                num_read += 1
                try:
                    if isinstance(raw.value, InvalidRecord):
                        raise raw.value
                    size = len(json.dumps(raw.value, ensure_ascii=False, default=str).encode("utf-8"))
                    if size > recipe.data.max_record_bytes:
                        raise InvalidRecord("oversize", f"{size} bytes > {recipe.data.max_record_bytes}")
                    messages = normalize_record(raw.value)
                except InvalidRecord as err:
                    reasons[err.reason] += 1
                    rejects.write(json.dumps({"source": raw.source, "position": raw.position,
                                              "reason": err.reason, "detail": str(err)}) + "\n")
                    continue
                record_id = conversation_id(messages)
                if record_id in seen:
                    num_duplicates += 1
                    continue
                seen.add(record_id)
                meta = raw.value.get("meta") or {}
                split = split_of(record_id, recipe.data.eval_fraction)
                split_ids[split].append(record_id)
                writers[split].add({
                    "id": record_id, "messages": messages, "source": raw.source,
                    "meta": json.dumps(meta, ensure_ascii=False, sort_keys=True),
                })
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
    fingerprint = _fingerprint(seen)
    return {
        "sources": [{"uri": s.uri, "weight": s.weight} for s in recipe.data.sources],
        "splits": {s: {"uris": w.uris, "num_conversations": w.num_rows, "fingerprint": _fingerprint(split_ids[s])}
                   for s, w in writers.items()},
        "num_records_read": num_read,
        "num_valid": len(seen),
        "num_duplicates": num_duplicates,
        "num_rejected": num_rejected,
        "reject_reasons": dict(sorted(reasons.items())),
        "rejects_uri": str(rejects_path),
        "fingerprint": fingerprint,
    }


def _fingerprint(record_ids) -> str:
    """sha256 over the sorted conversation ids: the same set of conversations, the same value."""
    return hashlib.sha256("\n".join(sorted(record_ids)).encode()).hexdigest()


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
