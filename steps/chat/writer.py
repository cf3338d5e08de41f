"""The dataset writer: records of data shards -> labelled token sequences -> packed rows -> token shards.

SFT conversations and DPO pairs go through this one writer; a :class:`TokenFormat` says what
differs: the columns a record has, the message lists of it that are rendered (its
*sequences*), and the columns of its rows. A conversation is one sequence; a pair
(``steps.dpo.PAIR_TOKENS``) is two, ``prompt + chosen`` and ``prompt + rejected``.

Every sequence is rendered and labelled as :func:`steps.chat.template.tokenize_conversation`
does it, through the fast renderer (``steps.chat.renderer``): batches of
``TOKENIZE_BATCH_SIZE`` sequences, encoded by one tokenizer call each, in this process (the
Rust tokenizer encodes on a second thread) or in ``num_workers`` processes, with the same rows
for any number. A record is kept when every sequence has a trained token and fits
``max_seq_tokens`` (cut per ``truncation``), and all of them fit one row together; otherwise
it is counted by why (too long, no trained token, the template's reason). Kept records are
packed whole, best fit decreasing on their total length (``steps.packing.pack_documents``),
each sequence restarting ``position_ids``. Rows of a format with ``sequence_ids`` say which
sequence of the row a token belongs to; for pairs, ``2k`` is the chosen and ``2k + 1`` the
rejected sequence of the row's pair ``k`` (``-`` is label -100)::

    pairs         P = (chosen [p c c], rejected [p r])    Q = (chosen [q c], rejected [q r r])
    row           input_ids     [p c c | p r | q c | q r r]
                  labels        [- c c | - r | - c | - r r]
                  position_ids  [0 1 2 | 0 1 | 0 1 | 0 1 2]
                  sequence_ids  [0 0 0 | 1 1 | 2 2 | 3 3 3]

Columns the writer cannot make (DPO's reference log-probs) come from a :class:`ComputedColumn`,
called with each shard's rows before the shard is written.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from steps.chat.renderer import LabelSettings, _label_batch, _label_rendered, _render_batch
from steps.chat.template import ChatTemplateError, _check_tokenizer, _encode, example_masked_text
from steps.packing import IGNORE_INDEX, pack_bins, pack_documents

TOKEN_SHARD_SCHEMA = pa.schema([
    ("input_ids", pa.list_(pa.int32())),
    ("labels", pa.list_(pa.int32())),
    ("position_ids", pa.list_(pa.int32())),
])
# Sequences per batched tokenizer call: large enough to amortise the call, small
# enough that the offsets of one batch stay a few MB.
TOKENIZE_BATCH_SIZE = 512


@dataclass(frozen=True, slots=True)
class TokenFormat:
    """How the writer reads one kind of record, which sequences of it it renders, and which columns its rows get."""

    noun: str
    """What the records are called in the stats (``num_<noun>``, ``num_packed_<noun>``) and messages."""
    columns: tuple[str, ...]
    """The data shard's columns a record needs, besides ``id``."""
    sequences: Callable[[Mapping], list[list[Mapping]]]
    """The message lists of a record to render and label, in the order they are laid out in a row."""
    num_sequences: int
    """How many message lists ``sequences`` gives for every record."""
    schema: pa.Schema
    """The columns of the rows: ``input_ids``, ``labels``, ``position_ids``, and ``sequence_ids`` if wanted."""


def _conversation_sequences(record: Mapping) -> list[list[Mapping]]:
    return [record["messages"]]


CONVERSATIONS = TokenFormat(noun="conversations", columns=("messages",), sequences=_conversation_sequences,
                            num_sequences=1, schema=TOKEN_SHARD_SCHEMA)
"""SFT conversations (``steps.ingest`` records): one sequence each, rows of :data:`TOKEN_SHARD_SCHEMA`."""


@dataclass(frozen=True, slots=True)
class ComputedColumn:
    """A column of the rows that the writer does not make itself (DPO's reference log-probs)."""

    field: pa.Field
    """Its name and type, a list type (one value per token)."""
    compute: Callable[[list[dict[str, np.ndarray]]], list[np.ndarray]]
    """Given the rows of a shard (:func:`split_rows`), one array per row, as long as the row."""


# ---------------------------------------------------------------------------------------------
# Rows


def pack_records(bins: Sequence[Sequence[int]], columns: Mapping[str, Sequence[np.ndarray]], num_sequences: int,
                 sequence_ids: bool = False) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Lay out bins of records whose sequences are the documents of ``columns``: flat columns and row lengths.

    Record ``i`` is documents ``i * num_sequences ... i * num_sequences + num_sequences - 1``;
    its sequences stay together, in order. The layout is ``steps.packing.pack_bins``'s
    (``position_ids`` restart at every sequence); ``sequence_ids`` adds the index of each token's
    sequence in its row. Two pairs in one row, pair 1 first::

        >>> input_ids = [np.array([1, 2]), np.array([1, 3, 4]), np.array([5]), np.array([5, 6])]
        >>> flat, row_lengths = pack_records([[1, 0]], {"input_ids": input_ids}, num_sequences=2, sequence_ids=True)
        >>> {name: values.tolist() for name, values in flat.items()}, row_lengths.tolist()
        ... # doctest: +NORMALIZE_WHITESPACE
        ({'input_ids': [5, 5, 6, 1, 2, 1, 3, 4], 'position_ids': [0, 0, 1, 0, 1, 0, 1, 2],
          'sequence_ids': [0, 1, 1, 2, 2, 3, 3, 3]}, [8])
    """
    document_bins = [[index * num_sequences + offset for index in indices for offset in range(num_sequences)]
                     for indices in bins]
    flat, row_lengths = pack_bins(document_bins, columns)
    if sequence_ids:
        sequence_index = np.cumsum(flat["position_ids"] == 0) - 1  # over all rows: every sequence starts at 0
        sequences_per_row = np.array([len(documents) for documents in document_bins], dtype=np.int64)
        first_of_row = np.repeat(np.cumsum(sequences_per_row) - sequences_per_row, row_lengths)
        flat["sequence_ids"] = (sequence_index - first_of_row).astype(np.int32)
    return flat, row_lengths


def split_rows(flat: Mapping[str, np.ndarray], row_lengths: np.ndarray) -> list[dict[str, np.ndarray]]:
    """Rows ``{name: array}`` of flat columns (views, no copy).

        >>> split_rows({"input_ids": np.array([7, 8, 9])}, np.array([2, 1]))
        [{'input_ids': array([7, 8])}, {'input_ids': array([9])}]
    """
    ends = np.cumsum(row_lengths)
    return [{name: values[start:end] for name, values in flat.items()}
            for start, end in zip((ends - row_lengths).tolist(), ends.tolist())]


def _arrow_values(values: np.ndarray, value_type: pa.DataType) -> pa.Array:
    # Wraps the numpy buffer as it is; pa.array() would first import pandas (a second, once).
    values = np.ascontiguousarray(values, dtype=value_type.to_pandas_dtype())
    return pa.Array.from_buffers(value_type, len(values), [None, pa.py_buffer(values)])


def _write_shard(path: Path, schema: pa.Schema, flat: Mapping[str, np.ndarray], row_lengths: np.ndarray) -> None:
    """Write rows given as flat columns and row lengths as one Parquet file."""
    offsets = _arrow_values(np.concatenate([[0], np.cumsum(row_lengths)]), pa.int32())
    table = pa.Table.from_arrays([pa.ListArray.from_arrays(offsets, _arrow_values(flat[field.name],
                                                                                  field.type.value_type))
                                  for field in schema], schema=schema)
    staging = path.with_name(f".{path.name}.writing-{os.getpid()}")
    pq.write_table(table, staging)
    os.replace(staging, path)  # a reader never sees half a shard


# ---------------------------------------------------------------------------------------------
# Labelling batches: in this process or in workers


_WORKER_SETTINGS: LabelSettings | None = None


def _init_worker(settings: LabelSettings) -> None:
    global _WORKER_SETTINGS
    _WORKER_SETTINGS = settings


def _label_batch_in_worker(job: tuple) -> tuple:
    context, sequences = job
    return context, _label_batch(_WORKER_SETTINGS, sequences)


def _start_method() -> str:
    """``fork`` (fast: the workers share the parent's tokenizer) unless this process has torch
    loaded: a process that has run torch holds OpenMP and allocator threads, and a child forked
    from it can deadlock on a lock one of them held (seen: the DPO tokenize step, which scores
    rows with the reference model between two pools). Then ``forkserver`` (``spawn`` off POSIX)."""
    import sys

    if os.name != "posix":
        return "spawn"
    return "forkserver" if "torch" in sys.modules else "fork"


class _BatchLabeller:
    """Runs ``steps.chat.renderer._label_batch`` over jobs ``(context, sequences)``, in this process or in a pool.

    Yields ``(context, outcomes)`` in input order. In this process, the Rust tokenizer encodes
    one batch on a thread while Python renders the next and labels the previous one. With
    workers, at most ``4 * num_workers`` batches are in flight, so memory does not grow with the
    dataset; the results (and so the rows) are the same for any number of workers.
    """

    def __init__(self, settings: LabelSettings, num_workers: int):
        self.settings, self.num_workers = settings, num_workers
        self.pool = None

    def _run_with_encoding_thread(self, jobs):
        """One process: the Rust tokenizer encodes batch k on a thread (it releases the GIL) while
        Python renders batch k+1 and labels batch k-1, so a second core is used without pickling."""
        from concurrent.futures import ThreadPoolExecutor

        pending = None
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="encode") as encoder:
            for context, sequences in jobs:
                outcomes, positions, rendered = _render_batch(self.settings, sequences)
                encoded = encoder.submit(_encode, self.settings.tokenizer, [item.text for item in rendered])
                if pending is not None:
                    yield self._finish(*pending)
                pending = (context, outcomes, positions, rendered, encoded)
            if pending is not None:
                yield self._finish(*pending)

    def _finish(self, context, outcomes, positions, rendered, encoded) -> tuple:
        return context, _label_rendered(self.settings, outcomes, positions, rendered, encoded.result())

    def __enter__(self) -> _BatchLabeller:
        if self.num_workers > 1:
            import multiprocessing

            self.pool = multiprocessing.get_context(_start_method()).Pool(
                self.num_workers, initializer=_init_worker, initargs=(self.settings,))
        return self

    def __exit__(self, *exc_info) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()

    def run(self, jobs):
        if self.pool is None:
            yield from self._run_with_encoding_thread(jobs)
            return
        window = []
        for job in jobs:
            window.append(job)
            if len(window) == 4 * self.num_workers:
                yield from self.pool.map(_label_batch_in_worker, window, chunksize=1)
                window = []
        if window:
            yield from self.pool.map(_label_batch_in_worker, window, chunksize=1)


def _read_jobs(data_uris: Sequence[str], token_format: TokenFormat) -> Iterator[tuple]:
    """Jobs ``((uri, record_ids), sequences)``: batches of a shard, not the whole shard, so memory holds
    a few batches of records plus the token arrays of the records kept so far."""
    records_per_batch = max(1, TOKENIZE_BATCH_SIZE // token_format.num_sequences)
    names = token_format.columns
    for uri in data_uris:
        for batch in pq.ParquetFile(uri).iter_batches(batch_size=records_per_batch, columns=["id", *names]):
            columns = [batch.column(name).to_pylist() for name in names]
            sequences = [sequence for values in zip(*columns)
                         for sequence in token_format.sequences(dict(zip(names, values)))]
            yield (uri, batch.column("id").to_pylist()), sequences


class _Tally:
    """The kept records' sequences, and the others counted by why, record by record in input order."""

    def __init__(self, max_seq_tokens: int):
        self.max_seq_tokens = max_seq_tokens
        self.input_ids: list[np.ndarray] = []  # one per sequence of a kept record
        self.trained: list[np.ndarray] = []
        self.record_lengths: list[int] = []  # one per kept record: its sequences' tokens together
        self.counts = Counter(num_records=0, num_truncated=0, num_dropped_too_long=0, num_no_trained_tokens=0)
        self.template_rejects: Counter[str] = Counter()
        self.first_template_reject = ""

    def add(self, uri: str, record_id: str, outcomes: Sequence) -> None:
        """Keep or count one record from the outcomes of its sequences (``steps.chat.renderer._label_batch``).

        The first sequence that fails decides why the record is not kept.
        """
        self.counts["num_records"] += 1
        failure = next((outcome for outcome in outcomes if not isinstance(outcome, tuple)), None)
        if isinstance(failure, ChatTemplateError):
            # Problems of one record are counted; a template that cannot be masked fails the step.
            if failure.reason not in ChatTemplateError.RECORD_REASONS:
                raise ChatTemplateError(f"{uri}, record {record_id}: {failure}", failure.reason) from failure
            self.template_rejects[failure.reason] += 1
            self.first_template_reject = self.first_template_reject or f"{uri}, record {record_id}: {failure}"
        elif failure == "no_trained_tokens":
            self.counts["num_no_trained_tokens"] += 1
        elif failure == "too_long" or sum(len(input_ids) for input_ids, _, _ in outcomes) > self.max_seq_tokens:
            self.counts["num_dropped_too_long"] += 1
        else:
            for input_ids, trained, _ in outcomes:
                self.input_ids.append(input_ids)
                self.trained.append(trained)
            self.record_lengths.append(sum(len(input_ids) for input_ids, _, _ in outcomes))
            self.counts["num_truncated"] += any(truncated for _, _, truncated in outcomes)

    def check_rejects(self, max_reject_fraction: float, noun: str) -> None:
        num_rejects, num_records = sum(self.template_rejects.values()), self.counts["num_records"]
        if num_rejects > max_reject_fraction * num_records:
            reasons = ", ".join(f"{reason}: {n}" for reason, n in self.template_rejects.most_common())
            raise ChatTemplateError(
                f"the chat template rejected {num_rejects} of {num_records} {noun} ({reasons}), more than "
                f"max_reject_fraction={max_reject_fraction}; the first: {self.first_template_reject}",
                self.template_rejects.most_common(1)[0][0])


# ---------------------------------------------------------------------------------------------
# The writer


def write_token_dataset(tokenizer, data_uris: Sequence[str], out_dir: Path, token_format: TokenFormat, *,
                        max_seq_tokens: int, truncation: str = "drop", rows_per_shard: int = 20000,
                        max_reject_fraction: float = 0.0, num_workers: int = 1,
                        computed: Sequence[ComputedColumn] = ()) -> dict:
    """Tokenize the records of data shards, pack them into rows, and write token shards (module docstring).

    Rows go to ``out_dir/part-00000.parquet, ...``, ``rows_per_shard`` each: the columns of
    ``token_format.schema`` (int32 lists, not padded) plus the ``computed`` ones. The same
    inputs always give the same rows, with any ``num_workers`` (packing is in this process).

    Returns:
        ``{"uris", "num_<noun>" (read), "num_packed_<noun>", "num_rows", "num_tokens" (real
        tokens), "num_trained_tokens", "num_truncated", "num_dropped_too_long",
        "num_no_trained_tokens", "num_template_rejects", "template_reject_reasons" ({reason: count}),
        "packing_efficiency" (num_tokens / (num_rows * max_seq_tokens)), "max_seq_tokens"}``.

    Raises:
        ChatTemplateError: the template itself cannot be masked (naming the shard and record
            id, as :func:`steps.chat.template.tokenize_conversation` would), or it rejects more
            than ``max_reject_fraction`` of the records (naming the reasons and the first).
    """
    _check_tokenizer(tokenizer, truncation)
    if max_seq_tokens < 1 or rows_per_shard < 1 or num_workers < 1:
        raise ValueError(f"max_seq_tokens, rows_per_shard and num_workers must be >= 1, got {max_seq_tokens}, "
                         f"{rows_per_shard}, {num_workers}")
    tally = _Tally(max_seq_tokens)
    num_sequences = token_format.num_sequences
    with _BatchLabeller(LabelSettings.for_tokenizer(tokenizer, max_seq_tokens, truncation), num_workers) as labeller:
        for (uri, record_ids), outcomes in labeller.run(_read_jobs(data_uris, token_format)):
            if len(outcomes) != num_sequences * len(record_ids):
                raise ValueError(f"{uri}: token_format.sequences must give {num_sequences} sequences per record")
            for position, record_id in enumerate(record_ids):
                tally.add(uri, record_id, outcomes[position * num_sequences: (position + 1) * num_sequences])
    tally.check_rejects(max_reject_fraction, token_format.noun)

    bins = pack_documents(tally.record_lengths, max_seq_tokens)
    schema = pa.schema([*token_format.schema, *(column.field for column in computed)])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob("part-*.parquet"):  # a retried step must not leave an earlier attempt's shards
        stale.unlink()
    uris = []
    num_tokens = num_trained_tokens = 0
    # One shard even when there is no row, so readers always find the schema.
    for shard_index, shard_start in enumerate(range(0, max(len(bins), 1), rows_per_shard)):
        flat, row_lengths = pack_records(bins[shard_start: shard_start + rows_per_shard],
                                         {"input_ids": tally.input_ids, "trained": tally.trained}, num_sequences,
                                         sequence_ids="sequence_ids" in schema.names)
        trained = flat.pop("trained").astype(bool)
        flat["labels"] = np.where(trained, flat["input_ids"], IGNORE_INDEX).astype(np.int32)
        num_tokens += len(trained)
        num_trained_tokens += int(trained.sum())
        rows = split_rows(flat, row_lengths) if computed and len(row_lengths) else []
        for column in computed:
            flat[column.field.name] = np.concatenate(column.compute(rows)) if rows else np.zeros(0)
        path = out_dir / f"part-{shard_index:05d}.parquet"
        _write_shard(path, schema, flat, row_lengths)
        uris.append(str(path))

    counts = tally.counts
    noun = token_format.noun
    return {
        "uris": uris,
        f"num_{noun}": counts["num_records"],
        "num_truncated": counts["num_truncated"],
        "num_dropped_too_long": counts["num_dropped_too_long"],
        "num_no_trained_tokens": counts["num_no_trained_tokens"],
        "num_template_rejects": sum(tally.template_rejects.values()),
        "template_reject_reasons": dict(sorted(tally.template_rejects.items())),
        f"num_packed_{noun}": len(tally.record_lengths),
        "num_rows": len(bins),
        "num_tokens": num_tokens,
        "num_trained_tokens": num_trained_tokens,
        "packing_efficiency": num_tokens / (len(bins) * max_seq_tokens) if bins else 0.0,
        "max_seq_tokens": max_seq_tokens,
    }


def tokenize_dataset(tokenizer, data_uris: Sequence[str], out_dir: Path, *, max_seq_tokens: int, truncation: str,
                     rows_per_shard: int = 20000, max_reject_fraction: float = 0.0, num_workers: int = 1) -> dict:
    """Tokenize the conversations of data shards, pack them into rows, and write token shards.

    :func:`write_token_dataset` with :data:`CONVERSATIONS`. Each conversation goes through the
    same rendering and labelling as :func:`steps.chat.template.tokenize_conversation`. Those
    longer than ``max_seq_tokens`` are dropped or cut per ``truncation``, those without a
    trained token are dropped, those the template cannot handle (``ChatTemplateError.reason``
    in ``RECORD_REASONS``, e.g. roles that do not alternate) are counted by reason, and the
    rest are packed into rows of at most ``max_seq_tokens`` (best fit decreasing plus a refill
    pass, see ``steps.packing.pack_documents``). Rows go to
    ``out_dir/part-00000.parquet, ...`` (``input_ids``, ``labels``, ``position_ids``: int32
    lists, not padded), ``rows_per_shard`` rows each.

    Returns:
        :func:`write_token_dataset`'s stats, for example (the default recipe's train split:
        builtin catalog chats, 256-token rows)::

            {"uris": [".../part-00000.parquet"], "num_conversations": 10708, "num_packed_conversations": 10708,
             "num_rows": 2697, "num_tokens": 681159, ..., "packing_efficiency": 0.987, "max_seq_tokens": 256}
    """
    return write_token_dataset(tokenizer, data_uris, out_dir, CONVERSATIONS, max_seq_tokens=max_seq_tokens,
                               truncation=truncation, rows_per_shard=rows_per_shard,
                               max_reject_fraction=max_reject_fraction, num_workers=num_workers)


# ---------------------------------------------------------------------------------------------
# The tokenize step of a flow


def first_record_text(tokenizer, token_uri: str, num_sequences: int = 1) -> str:
    """The first record of a token shard's first row, its trained tokens in ``[[ ]]`` (``example_masked_text``).

    The record is the row's first ``num_sequences`` sequences (each starts at ``position_ids`` 0),
    e.g. a pair's chosen and rejected sequence::

        <|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n[[Hello!<|im_end|>]]\\n
        <|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n[[Go away.<|im_end|>]]\\n
    """
    batch = next(pq.ParquetFile(token_uri).iter_batches(batch_size=1, columns=["input_ids", "labels",
                                                                                 "position_ids"]))
    row = batch.to_pylist()[0]
    starts = [index for index, position in enumerate(row["position_ids"]) if position == 0]
    end = starts[num_sequences] if len(starts) > num_sequences else len(row["input_ids"])
    return example_masked_text(tokenizer, row["input_ids"][:end], row["labels"][:end])


def write_splits(recipe, tokenizer, dataset_manifest: dict, run_root: str, token_format: TokenFormat, *,
                 truncation: str, computed: Sequence[ComputedColumn] = (),
                 required_splits: Sequence[str] = ("train",)) -> dict:
    """Token shards of every split under ``<run_root>/tokens/<split>/``, with the recipe's ``tokenize`` settings.

    Returns ``{split: stats (write_token_dataset's), ..., "packing_efficiency": train's,
    "example": str}``, ``example`` being :func:`first_record_text` of the first training row.

    Raises:
        ValueError: a split of ``required_splits`` has no row left.
    """
    from steps.storage import subdir

    settings, noun = recipe.tokenize, token_format.noun
    stats: dict = {}
    for split, info in dataset_manifest["splits"].items():
        split_stats = stats[split] = write_token_dataset(
            tokenizer, info["uris"], subdir(run_root, "tokens", split), token_format,
            max_seq_tokens=settings.max_seq_tokens, truncation=truncation,
            max_reject_fraction=settings.max_reject_fraction, num_workers=settings.num_workers or os.cpu_count() or 1,
            computed=computed)
        print(f"tokenize {split}: {split_stats[f'num_packed_{noun}']} {noun} -> {split_stats['num_rows']} rows, "
              f"packing efficiency {split_stats['packing_efficiency']:.3f}")
        if split in required_splits and split_stats["num_rows"] == 0:
            together = " (a record's sequences share one row)" if token_format.num_sequences > 1 else ""
            raise ValueError(
                f"none of the {split_stats[f'num_{noun}']} {split} {noun} survived tokenization: "
                f"{split_stats['num_dropped_too_long']} longer than tokenize.max_seq_tokens={settings.max_seq_tokens}"
                f"{together}, {split_stats['num_no_trained_tokens']} without a trained token, "
                f"{split_stats['num_template_rejects']} rejected by the chat template")
    stats["example"] = first_record_text(tokenizer, stats["train"]["uris"][0], token_format.num_sequences)
    stats["packing_efficiency"] = stats["train"]["packing_efficiency"]
    return stats


def tokenize_splits(recipe, base_model: str | Path, dataset_manifest: dict, run_root: str) -> dict:
    """The SFT tokenize step: token shards of conversations for every split under ``<run_root>/tokens/<split>/``.

    Returns ``{"train": stats, "eval": stats, "packing_efficiency": train's, "example": str}``
    (:func:`write_splits`), ``example`` being one training conversation with its trained tokens
    wrapped in ``[[ ]]``.
    """
    from steps.models import load_tokenizer

    tokenizer = load_tokenizer(base_model, recipe.model.trust_remote_code)
    return write_splits(recipe, tokenizer, dataset_manifest, run_root, CONVERSATIONS,
                        truncation=recipe.tokenize.truncation)
