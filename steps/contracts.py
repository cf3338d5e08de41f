"""The contracts between steps: the shapes of the artifacts they hand each other, and their names.

A flow step keeps small, plain data in ``self.*`` (dicts, lists, strings, numbers: what Metaflow
pickles cheaply and a notebook reads through the Client). The ``TypedDict`` classes below name
the keys of each artifact; they are type hints, not wrappers, so an artifact stays a plain dict
that travels as it always did. Big data never appears here: these dicts hold file URIs.

    ingest    -> dataset_manifest  (DatasetManifest)
    tokenize  -> token_stats       (TokenStats)
    train     -> checkpoints       (list of checkpoint folders), train_curve (list of CurvePoint)
    evaluate  -> metrics           (EvalRow, one per model scored; eval_metrics is their list)
    register  -> promotion         (Promotion)

Row names of the metrics table: every checkpoint's row is named after its folder
(``step-000400``); the model a run started from is :data:`BASELINE_ROW`, a distillation's teacher
:data:`TEACHER_ROW`.

>>> [row["checkpoint"] for row in scored_checkpoints([{"checkpoint": BASELINE_ROW}, {"checkpoint": "step-000010"}])]
['step-000010']
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, TypedDict

BASELINE_ROW = "base"
"""The ``checkpoint`` name of the starting model's row (the base model, DPO's starting policy,
the retrain's warm-start champion): what every checkpoint is compared with."""

TEACHER_ROW = "teacher"
"""The ``checkpoint`` name of the teacher's row in a distillation run (scored, never registered)."""

TASK_METRICS = ("task_score", "recommend_valid", "search_hit_at_1", "qa_accuracy")
"""Generation metrics of the catalog evaluator (the share of held-out requests answered right)."""

HELDOUT_METRICS = ("eval_loss", "perplexity", "assistant_token_accuracy")
"""Teacher-forced metrics on the held-out token rows (trained positions only)."""

METRICS = TASK_METRICS + HELDOUT_METRICS
"""The one metric list: what the run summary, the cards, the registry listing and the teacher
comparison show, in this order, for the metrics a row has."""


class SplitManifest(TypedDict):
    """One split (``train`` or ``eval``) of :class:`DatasetManifest`."""

    uris: list[str]
    """Parquet shards of normalised records."""
    num_conversations: int
    fingerprint: str
    """sha256 over the split's record ids: equal fingerprints, equal data."""


class DatasetManifest(TypedDict, total=False):
    """``self.dataset_manifest``: what ingest kept, dropped and rejected, and where it wrote it."""

    splits: dict[str, SplitManifest]
    fingerprint: str
    """sha256 of both splits' content (not of where it was read from)."""
    sources: list[dict]
    """Per source: its URI, weight and counts."""
    num_records_read: int
    num_valid: int
    num_duplicates: int
    num_rejected: int
    reject_reasons: dict[str, int]
    rejects_uri: str
    """``data/rejects.jsonl``: one line per reject with its source, line or row, and reason."""


class SplitTokenStats(TypedDict, total=False):
    """One split of :class:`TokenStats`."""

    uris: list[str]
    """Parquet shards of packed rows (``input_ids``, ``labels``, ``position_ids``)."""
    max_seq_tokens: int
    num_conversations: int
    num_packed_conversations: int
    num_rows: int
    num_tokens: int
    num_trained_tokens: int
    packing_efficiency: float
    num_dropped_too_long: int


class TokenStats(TypedDict, total=False):
    """``self.token_stats``: the token shards of each split, counts, and one masked example."""

    train: SplitTokenStats
    eval: SplitTokenStats
    packing_efficiency: float
    example: str
    """A training conversation with its trained tokens in ``[[ ]]``."""


class CurvePoint(TypedDict, total=False):
    """One logged optimizer step of ``self.train_curve`` (objectives add their own metrics)."""

    step: int
    loss: float
    lr: float
    tokens_per_s: float
    tflops_per_device: float
    mfu: float | None


class EvalRow(TypedDict, total=False):
    """One model's row of ``self.eval_metrics`` (plus any metric an evaluator returns)."""

    checkpoint: str
    """``step-NNNNNN``, :data:`BASELINE_ROW` or :data:`TEACHER_ROW`."""
    path: str
    step: int
    per_request: dict
    """``{"metric", "scores"}``: the select metric of each held-out request, for paired tests."""


class Promotion(TypedDict, total=False):
    """``self.promotion``: the gate's decision (also ``promotion.json`` beside the version)."""

    promoted: bool
    alias: str
    reason: str
    champion_version: int | None


def scored_checkpoints(rows: Sequence[EvalRow]) -> list[EvalRow]:
    """The rows of trained checkpoints: those a run may register (not the baseline or teacher)."""
    return [row for row in rows if row["checkpoint"] not in (BASELINE_ROW, TEACHER_ROW)]


def baseline_row(rows: Sequence[EvalRow]) -> EvalRow | None:
    """The starting model's row, or None when the run did not score it.

    >>> baseline_row([{"checkpoint": "step-000002"}, {"checkpoint": "base", "task_score": 0.1}])
    {'checkpoint': 'base', 'task_score': 0.1}
    """
    return next((row for row in rows if row["checkpoint"] == BASELINE_ROW), None)


_STEP_IN_NAME = re.compile(r"step-(\d+)$")


def row_step(row: Mapping[str, Any]) -> int:
    """A row's optimizer step: its ``step`` key, else the ``step-K`` end of ``checkpoint``, else -1.

    >>> row_step({"checkpoint": "step-000400"}), row_step({"checkpoint": "base"})
    (400, -1)
    """
    if isinstance(row.get("step"), int):
        return row["step"]
    match = _STEP_IN_NAME.search(str(row.get("checkpoint", "")))
    return int(match.group(1)) if match else -1


def reported(row: Mapping[str, Any]) -> list[str]:
    """The metrics of :data:`METRICS` that ``row`` has, in report order.

    >>> reported({"eval_loss": 0.5, "task_score": 0.9, "other": 1})
    ['task_score', 'eval_loss']
    """
    return [key for key in METRICS if key in row]
