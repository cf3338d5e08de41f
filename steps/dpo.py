"""Direct preference optimisation: preference pairs -> packed pair rows -> the ``dpo`` objective.

DPO reuses every SFT step; what is its own lives here:

- **Data** (:data:`PAIRS`, a ``steps.ingest.RecordFormat``): records
  ``{"prompt": messages, "chosen": assistant message(s), "rejected": assistant message(s)}``, or
  the flat form with strings (``{"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."}``),
  validated by ``steps.ingest.normalize_record`` (prompt + response), rejected with reasons,
  deduped by a hash of the pair as SFT conversations are, and split by a hash of the prompt
  (:func:`prompt_key`), so all pairs of one prompt are on one side.
- **Tokens** (:data:`PAIR_TOKENS`, a record format of the shared dataset writer
  ``steps.chat.writer``): ``prompt + chosen`` and ``prompt + rejected`` are rendered and
  labelled in batches as SFT conversations are (only the response is trained, as
  ``steps.chat.tokenize_conversation`` labels it), and a pair's two sequences are packed into
  the same row, one after the other, so a micro-batch always holds whole pairs. Each sequence
  restarts ``position_ids`` (attention never crosses sequences), and ``sequence_ids`` says
  which sequence of which pair a token belongs to::

      row           [ p p c c | p p r r r | p c | p r r ]      (p prompt, c chosen, r rejected)
      position_ids  [ 0 1 2 3 | 0 1 2 3 4 | 0 1 | 0 1 2 ]
      labels        [ - - c c | - - r r r | - c | - r r ]      (- = -100)
      sequence_ids  [ 0 0 0 0 | 1 1 1 1 1 | 2 2 | 3 3 3 ]      (2k: chosen of pair k, 2k+1: its rejected)
      ref_logps     [ 0 0 0 x | 0 0 0 x x | 0 x | 0 0 x ]      (x: log p_ref(token | earlier tokens))

  Padding gets ``sequence_ids`` -1. ``ref_logps`` comes from one pass of the reference model
  before training (:func:`add_reference_logps`), so training holds no second model.
- **Loss** (:class:`DPOObjective`, registered as ``"dpo"`` in ``steps.objectives``): the
  sequence log-prob is the sum of its trained tokens' log-probs, and per pair::

      delta   = (log pi(c) - log ref(c)) - (log pi(r) - log ref(r))
      sigmoid = -(1 - eps) * logsigmoid(beta * delta) - eps * logsigmoid(-beta * delta)
      ipo     = (delta_per_token - 1 / (2 * beta)) ** 2       (log-ratios divided by response tokens)

  The step's loss is the mean over its pairs. ``sigmoid`` and ``ipo`` equal TRL's
  ``DPOTrainer`` losses (tested); ``eps`` (``dpo.label_smoothing``) is conservative DPO.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from steps import ingest
from steps.chat.writer import ComputedColumn, TokenFormat, pack_records, split_rows, write_splits
from steps.config import DPOConfig, Recipe, warn_ignored
from steps.losses import IGNORE_INDEX, mask_padded_logits, shifted_targets
from steps.packing import collate_rows, pack_documents

PAIR_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("prompt", pa.list_(ingest.MESSAGE_TYPE)),
    ("chosen", pa.list_(ingest.MESSAGE_TYPE)),
    ("rejected", pa.list_(ingest.MESSAGE_TYPE)),
    ("meta", pa.string()),
    ("source", pa.string()),
])

PAIR_ROW_SCHEMA = pa.schema([
    ("input_ids", pa.list_(pa.int32())),
    ("labels", pa.list_(pa.int32())),
    ("position_ids", pa.list_(pa.int32())),
    ("sequence_ids", pa.list_(pa.int32())),
])
"""What the dataset writer lays out for pairs (:data:`PAIR_TOKENS`)."""
REF_LOGPS_FIELD = pa.field("ref_logps", pa.list_(pa.float32()))
PAIR_TOKEN_SCHEMA = PAIR_ROW_SCHEMA.append(REF_LOGPS_FIELD)
"""The DPO token shards: the pair rows plus the reference model's log-probs."""

PAD_SEQUENCE = -1
"""``sequence_ids`` of padding tokens."""


# ---------------------------------------------------------------------------------------------
# Data: records -> validated pairs (a steps.ingest.RecordFormat)
# ---------------------------------------------------------------------------------------------

def _as_messages(value: object, role: str) -> object:
    """A string becomes one message of ``role``; one message dict becomes a list of it."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, dict):
        return [value]
    return value


def normalize_pair(record: object) -> dict:
    """Return ``{"prompt", "chosen", "rejected"}`` message lists of a record, or raise ``InvalidRecord``.

    The prompt's messages are context (``train: False``); each response must be assistant turns.
    ``prompt + chosen`` and ``prompt + rejected`` are validated as SFT conversations are
    (``steps.ingest.normalize_record``: roles, string content, ends with the assistant), so the
    reject reasons are the same, plus ``identical_responses`` and ``response_not_assistant``.

    >>> pair = normalize_pair({"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."})
    >>> pair["prompt"], pair["rejected"]
    ([{'role': 'user', 'content': 'Hi', 'train': False}], [{'role': 'assistant', 'content': 'Go away.', 'train': True}])
    >>> normalize_pair({"prompt": "Hi", "chosen": "Hello!", "rejected": "Hello!"})
    Traceback (most recent call last):
    steps.ingest.InvalidRecord: identical_responses
    """
    if not isinstance(record, dict):
        raise ingest.InvalidRecord("not_an_object", type(record).__name__)
    missing = [key for key in ("prompt", "chosen", "rejected") if record.get(key) is None]
    if missing:
        raise ingest.InvalidRecord("unknown_shape", f"expected 'prompt', 'chosen' and 'rejected'; missing {missing}")
    prompt = _as_messages(record["prompt"], "user")
    if not isinstance(prompt, list) or not prompt:
        raise ingest.InvalidRecord("bad_messages", "'prompt' is not a non-empty string or list of messages")
    # The prompt is context only, even where it holds earlier assistant turns.
    prompt = [dict(m, train=False) if isinstance(m, dict) else m for m in prompt]
    pair = {}
    for key in ("chosen", "rejected"):
        response = _as_messages(record[key], "assistant")
        if not isinstance(response, list) or not response:
            raise ingest.InvalidRecord("bad_messages", f"'{key}' is not a non-empty string or list of messages")
        if not isinstance(response[0], dict) or response[0].get("role") != "assistant":
            raise ingest.InvalidRecord("response_not_assistant", f"'{key}' does not start with an assistant turn")
        conversation = ingest.normalize_record({"messages": prompt + response})
        pair["prompt"], pair[key] = conversation[:len(prompt)], conversation[len(prompt):]
    if pair["chosen"] == pair["rejected"]:
        raise ingest.InvalidRecord("identical_responses")
    return pair


def _digest(pair: dict, keys: Sequence[str]) -> str:
    canonical = json.dumps([[[m["role"], m["content"], m["train"]] for m in pair[key]] for key in keys],
                           ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def pair_id(pair: dict) -> str:
    """sha256 of the normalized pair: it dedupes pairs."""
    return _digest(pair, ("prompt", "chosen", "rejected"))


def prompt_key(pair: dict) -> str:
    """sha256 of the normalized prompt: it decides the pair's split (``ingest.split_of``).

    Every pair of one prompt lands on the same side, so no prompt is both trained on and held
    out, and other responses to a prompt (new rejected answers) leave the eval set unchanged.
    """
    return _digest(pair, ("prompt",))


PAIRS = ingest.RecordFormat(schema=PAIR_SCHEMA, normalize=normalize_pair, record_id=pair_id, split_key=prompt_key)
"""Preference pairs for ``steps.ingest.ingest(recipe, run_root, record_format=PAIRS)``."""


# ---------------------------------------------------------------------------------------------
# Tokens: pairs -> packed rows (both sequences of a pair in one row) + reference log-probs
# ---------------------------------------------------------------------------------------------

def pack_pairs(pairs: Sequence[tuple[tuple[Sequence[int], Sequence[int]], tuple[Sequence[int], Sequence[int]]]],
               row_tokens: int) -> list[dict[str, np.ndarray]]:
    """Pack ``((chosen_ids, chosen_labels), (rejected_ids, rejected_labels))`` pairs into rows.

    A pair is one unit of ``len(chosen) + len(rejected)`` tokens for the best-fit-decreasing
    packer (``steps.packing.pack_documents``), so its two sequences share a row; within a row,
    pair ``k`` has ``sequence_ids`` ``2k`` (chosen) and ``2k + 1`` (rejected). The layout is the
    dataset writer's (``steps.chat.writer.pack_records``), for sequences tokenized elsewhere::

        >>> rows = pack_pairs([(([1, 2], [-100, 2]), ([1, 3, 4], [-100, 3, 4]))], row_tokens=8)
        >>> {name: values.tolist() for name, values in rows[0].items()}  # doctest: +NORMALIZE_WHITESPACE
        {'input_ids': [1, 2, 1, 3, 4], 'labels': [-100, 2, -100, 3, 4], 'position_ids': [0, 1, 0, 1, 2],
         'sequence_ids': [0, 0, 1, 1, 1]}
    """
    bins = pack_documents([len(chosen[0]) + len(rejected[0]) for chosen, rejected in pairs], row_tokens)
    sequences = [sequence for pair in pairs for sequence in pair]
    flat, row_lengths = pack_records(bins, {"input_ids": [input_ids for input_ids, _ in sequences],
                                            "labels": [labels for _, labels in sequences]},
                                     num_sequences=2, sequence_ids=True)
    return split_rows(flat, row_lengths)


def token_logps(logits: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """``[rows, tokens]`` log-probs of each trained token given the earlier tokens of its sequence (fp32).

    Aligned with ``labels``: the value at ``i`` is ``log p(labels[i] | tokens < i)``, from
    ``logits[i - 1]``; 0 where ``i`` is no target (label -100 or a sequence start).
    """
    targets = shifted_targets(labels, position_ids)
    logps = -F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX,
                             reduction="none").view_as(targets)
    return F.pad(logps, (1, 0))


def _target_mask(labels: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """Aligned with ``labels`` like :func:`token_logps`: 1.0 where a token is a trained target."""
    return F.pad((shifted_targets(labels, position_ids) != IGNORE_INDEX).float(), (1, 0))


def sequence_sums(values: torch.Tensor, sequence_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair sums of a per-token ``[rows, tokens]`` tensor: ``([rows, pairs, 2], pair_mask [rows, pairs])``.

    ``[..., 0]`` is the chosen sequence's sum, ``[..., 1]`` the rejected one's; ``pairs`` is the
    most pairs any row holds, and ``pair_mask`` marks the pairs a row really has.

    >>> values = torch.tensor([[1., 2., 3., 4., 0.], [5., 6., 0., 0., 0.]])
    >>> ids = torch.tensor([[0, 0, 1, 2, 3], [0, 1, -1, -1, -1]])
    >>> sums, mask = sequence_sums(values, ids)
    >>> sums.tolist(), mask.tolist()
    ([[[3.0, 3.0], [4.0, 0.0]], [[5.0, 6.0], [0.0, 0.0]]], [[True, True], [True, False]])
    """
    pairs_per_row = (sequence_ids.max(dim=1).values + 1) // 2  # ids are 0 .. 2n-1 in a row of n pairs
    num_pairs = max(1, int(pairs_per_row.max()))
    is_real = sequence_ids != PAD_SEQUENCE
    sums = values.new_zeros(values.shape[0], 2 * num_pairs).scatter_add(
        1, sequence_ids.clamp(min=0), values.masked_fill(~is_real, 0))
    pair_mask = torch.arange(num_pairs, device=values.device) < pairs_per_row.unsqueeze(1)
    return sums.view(values.shape[0], num_pairs, 2), pair_mask


def collate_pair_rows(rows: Sequence[dict], row_tokens: int, pad_id: int) -> dict[str, torch.Tensor]:
    """``steps.packing.collate_rows`` plus ``sequence_ids`` (padding -1) and ``ref_logps`` (padding 0)."""
    batch = collate_rows(rows, row_tokens, pad_id)
    sequence_ids = torch.full((len(rows), row_tokens), PAD_SEQUENCE, dtype=torch.long)
    ref_logps = torch.zeros((len(rows), row_tokens), dtype=torch.float32)
    for index, row in enumerate(rows):
        length = len(row["input_ids"])
        sequence_ids[index, :length] = torch.as_tensor(row["sequence_ids"], dtype=torch.long)
        if "ref_logps" in row:
            ref_logps[index, :length] = torch.as_tensor(row["ref_logps"], dtype=torch.float32)
    return {**batch, "sequence_ids": sequence_ids, "ref_logps": ref_logps}


def _batches(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def add_reference_logps(model, rows: list[dict], *, row_tokens: int, pad_id: int, batch_rows: int = 8) -> None:
    """Set ``row["ref_logps"]`` (float32, :func:`token_logps` of the reference ``model``) on every row.

    The rows run as training runs them (padded to ``row_tokens``, ``position_ids``, no attention
    mask), so a policy equal to the reference starts with log-ratios of exactly 0.
    """
    device = next(model.parameters()).device
    bf16 = device.type == "cuda"  # as the trainer's autocast on GPU
    with torch.no_grad():
        for chunk in _batches(rows, batch_rows):
            batch = {k: v.to(device) for k, v in collate_rows(chunk, row_tokens, pad_id).items()}
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                # use_cache=False: with a cache, transformers does not build the per-sequence mask.
                logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                               use_cache=False).logits
            logps = token_logps(logits, batch["labels"], batch["position_ids"]).cpu().numpy()
            for row, values in zip(chunk, logps):
                row["ref_logps"] = values[:len(row["input_ids"])].astype(np.float32)


def read_pairs(data_uris: Sequence[str]) -> Iterator[dict]:
    """Pair records ``{id, prompt, chosen, rejected, meta (JSON text), source}`` of data shards, in order."""
    for uri in data_uris:
        for batch in pq.ParquetFile(uri).iter_batches(batch_size=4096):
            yield from batch.to_pylist()


def _pair_sequences(pair: Mapping) -> list[list[Mapping]]:
    return [pair["prompt"] + pair["chosen"], pair["prompt"] + pair["rejected"]]


PAIR_TOKENS = TokenFormat(noun="pairs", columns=("prompt", "chosen", "rejected"), sequences=_pair_sequences,
                          num_sequences=2, schema=PAIR_ROW_SCHEMA)
"""Pairs for the shared dataset writer (``steps.chat.write_token_dataset(..., PAIR_TOKENS, ...)``).

A pair is a record of two sequences, ``prompt + chosen`` and ``prompt + rejected``, rendered and
labelled in the same batches as SFT conversations (only the response and its end-of-turn token
are trained). A pair is dropped when both together exceed ``max_seq_tokens`` (a row), when a
response has no trained token, or when the template refuses a sequence (counted by reason, as in
SFT); the rows are :func:`pack_pairs`' (the module docstring's picture), without ``ref_logps``.
"""


def tokenize_splits(recipe: Recipe, policy_path: str | Path, reference_path: str | Path, dataset_manifest: dict,
                    run_root: str) -> dict:
    """The DPO tokenize step: packed pair rows with reference log-probs under ``<run_root>/tokens/<split>/``.

    The pairs go through the shared dataset writer (``steps.chat.write_splits`` with
    :data:`PAIR_TOKENS`, the recipe's ``tokenize`` settings; a pair is never truncated). The
    reference model (``reference_path``; the starting policy unless ``dpo.reference`` names
    another) scores every row once, shard by shard before it is written, on the GPU if there is
    one (:func:`add_reference_logps`). Returns ``{"train": stats, "eval": stats,
    "packing_efficiency": train's, "example": str, "reference_seconds": float}``; each ``stats``
    is ``steps.chat.write_token_dataset``'s (``num_pairs``, ``num_packed_pairs``,
    ``num_dropped_too_long``, ...), and ``example`` shows the first training pair with its trained
    tokens in ``[[ ]]``.
    """
    from steps.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(policy_path, recipe.model.trust_remote_code)
    reference_tokenizer = load_tokenizer(reference_path, recipe.model.trust_remote_code)
    if reference_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise ValueError(f"the reference model {reference_path} has another vocabulary than the policy "
                         f"{policy_path}; DPO compares their log-probs token by token")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    reference = load_model(reference_path, recipe.model.trust_remote_code, recipe.model.attn_implementation,
                           device_type=device.type).to(device).eval()
    row_tokens = recipe.tokenize.max_seq_tokens
    reference_seconds = 0.0

    def reference_logps(rows: list[dict]) -> list[np.ndarray]:
        nonlocal reference_seconds
        start = time.perf_counter()
        add_reference_logps(reference, rows, row_tokens=row_tokens, pad_id=tokenizer.pad_token_id,
                            batch_rows=max(1, recipe.train.micro_batch_tokens // row_tokens))
        reference_seconds += time.perf_counter() - start
        return [row["ref_logps"] for row in rows]

    # Every split needs rows: the held-out pairs are scored by preference_metrics.
    stats = write_splits(recipe, tokenizer, dataset_manifest, run_root, PAIR_TOKENS, truncation="drop",
                         computed=[ComputedColumn(REF_LOGPS_FIELD, reference_logps)],
                         required_splits=tuple(dataset_manifest["splits"]))
    return {**stats, "reference_seconds": reference_seconds}


# ---------------------------------------------------------------------------------------------
# On-policy rejected answers (dpo.rejected: on_policy)
# ---------------------------------------------------------------------------------------------

def first_failing(chosen_score: float, candidates: Sequence[tuple[str, float]]) -> int | None:
    """The index of the first candidate ``(answer, score)`` that scores lower than the chosen answer.

    Empty answers are skipped (a rejected response needs content).

    >>> first_failing(1.0, [("right", 1.0), ("", 0.0), ("wrong", 0.0)])
    2
    >>> first_failing(0.5, [("a", 0.5), ("b", 0.75)]) is None
    True
    """
    for index, (answer, score) in enumerate(candidates):
        if answer.strip() and score < chosen_score:
            return index
    return None


def on_policy_rejected(recipe: Recipe, policy_path: str | Path, dataset_manifest: dict, run_root: str) -> dict:
    """Replace the training pairs' rejected answers with the starting policy's own failing answers.

    For every training pair the policy answers the prompt greedily and ``dpo.on_policy_samples``
    times at ``dpo.on_policy_temperature`` (seeded by the recipe's seed; same generation limits
    as the task metrics). The recipe's evaluators score the chosen answer and each policy answer
    alone by ``dpo.on_policy_metric`` (higher is better); the first answer that scores lower than
    the chosen one, greedy first, becomes the pair's rejected answer::

        prompt   "Which 1987 thriller stars Ana Reyes?"     chosen "The Silent Harbor" (score 1)
        policy   greedy "Iron Tide" (0)   samples "The Silent Harbor" (1), "Echo at Ashford" (0)
        pair     chosen "The Silent Harbor"   rejected "Iron Tide"     (the greedy mistake)

    A pair whose policy answers all pass keeps the dataset's rejected answer. The held-out split
    is not touched. Writes ``<run_root>/data/train-on-policy/part-00000.parquet`` and returns the
    manifest with that train split and ``on_policy`` statistics: ``num_pairs``,
    ``greedy_pass_rate`` (the share of training prompts whose greedy answer scores no worse than
    the chosen one), ``num_from_greedy``,
    ``num_from_samples``, ``num_kept`` and ``example`` (the first replaced pair).
    """
    from steps.evaluate import answer_scores, generate_answers, load_evaluator
    from steps.models import load_model, load_tokenizer
    from steps.storage import subdir

    config, metric = recipe.dpo, recipe.dpo.on_policy_metric
    evaluators = [load_evaluator(spec) for spec in recipe.evaluate.evaluators]
    pairs = list(read_pairs(dataset_manifest["splits"]["train"]["uris"]))
    records = [{**pair, "meta": json.loads(pair["meta"] or "{}")} for pair in pairs]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = load_tokenizer(policy_path, recipe.model.trust_remote_code)
    model = load_model(policy_path, recipe.model.trust_remote_code, "sdpa", device_type=device.type).to(device).eval()
    prompts = [[{"role": m["role"], "content": m["content"]} for m in pair["prompt"]] for pair in pairs]
    start = time.perf_counter()
    limits = {"max_new_tokens": recipe.evaluate.max_new_tokens, "batch_size": recipe.evaluate.generation_batch_size}
    answers = generate_answers(model, tokenizer, prompts, **limits)
    if config.on_policy_samples:
        sampled = generate_answers(model, tokenizer, prompts, num_samples=config.on_policy_samples,
                                   temperature=config.on_policy_temperature, seed=recipe.seed, **limits)
        answers = [greedy + more for greedy, more in zip(answers, sampled, strict=True)]
    seconds = time.perf_counter() - start
    chosen_scores = answer_scores(evaluators, metric, records, [p["chosen"][-1]["content"] for p in pairs])
    counts = Counter(num_from_greedy=0, num_from_samples=0, num_kept=0)
    greedy_passed = 0
    example = None
    for pair, prompt, record, chosen_score, candidates in zip(pairs, prompts, records, chosen_scores, answers,
                                                              strict=True):
        scores = answer_scores(evaluators, metric, [record] * len(candidates), candidates)
        greedy_passed += scores[0] >= chosen_score
        index = first_failing(chosen_score, list(zip(candidates, scores)))
        if index is None:
            counts["num_kept"] += 1
            continue
        counts["num_from_greedy" if index == 0 else "num_from_samples"] += 1
        pair["rejected"] = [{"role": "assistant", "content": candidates[index], "train": True}]
        example = example or {"prompt": prompt, "chosen": pair["chosen"][-1]["content"],
                              "rejected": candidates[index], "from": "greedy" if index == 0 else "sample"}
    out = subdir(run_root, "data", "train-on-policy")
    for stale in out.glob("part-*.parquet"):  # a retried step must not leave an earlier attempt's shards
        stale.unlink()
    path = out / "part-00000.parquet"
    pq.write_table(pa.Table.from_pylist(pairs, schema=PAIR_SCHEMA), path)
    stats = {"num_pairs": len(pairs), "greedy_pass_rate": greedy_passed / max(len(pairs), 1), **counts,
             "num_answers": sum(len(c) for c in answers), "generation_seconds": seconds, "example": example,
             "judged_by": f"{metric} of {', '.join(recipe.evaluate.evaluators)}"}
    print(f"on-policy rejected answers: {counts['num_from_greedy']} greedy + {counts['num_from_samples']} sampled "
          f"of {len(pairs)} training pairs (the policy's greedy answers pass {stats['greedy_pass_rate']:.1%}); "
          f"{counts['num_kept']} keep the dataset's; {stats['num_answers']} answers in {seconds:.0f} s")
    train = {**dataset_manifest["splits"]["train"], "uris": [str(path)]}
    return {**dataset_manifest, "splits": {**dataset_manifest["splits"], "train": train}, "on_policy": stats}


# ---------------------------------------------------------------------------------------------
# Loss: the "dpo" objective
# ---------------------------------------------------------------------------------------------

def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, *, beta: float, loss: str = "sigmoid", label_smoothing: float = 0.0,
             chosen_tokens: torch.Tensor | None = None, rejected_tokens: torch.Tensor | None = None) -> torch.Tensor:
    """Per-pair losses from sequence log-probs (sums over each response's trained tokens).

    ``ipo`` divides each log-ratio by its response's trained tokens (``chosen_tokens``,
    ``rejected_tokens``), as TRL does.

    >>> zero = torch.zeros(1)
    >>> round(float(dpo_loss(zero, zero, zero, zero, beta=0.1)), 6)  # log 2: policy == reference
    0.693147
    >>> float(dpo_loss(zero, zero, zero, zero, beta=0.5, loss="ipo", chosen_tokens=torch.ones(1),
    ...                rejected_tokens=torch.ones(1)))  # (0 - 1 / (2 * 0.5)) ** 2
    1.0
    """
    chosen_logratios = policy_chosen - ref_chosen
    rejected_logratios = policy_rejected - ref_rejected
    if loss == "sigmoid":
        delta = beta * (chosen_logratios - rejected_logratios)
        return -(1 - label_smoothing) * F.logsigmoid(delta) - label_smoothing * F.logsigmoid(-delta)
    if loss == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("the ipo loss needs chosen_tokens and rejected_tokens")
        delta = chosen_logratios / chosen_tokens.clamp(min=1) - rejected_logratios / rejected_tokens.clamp(min=1)
        return (delta - 1 / (2 * beta)) ** 2
    raise ValueError(f"unknown DPO loss {loss!r} (known: sigmoid, ipo)")


class DPOLoss(torch.nn.Module):
    """A causal LM whose forward returns the summed DPO loss and metrics of a batch of pair rows.

    Returns sums over the batch's pairs (the trainer divides them by the step's pairs):
    ``loss``, ``reward_accuracy`` (pairs whose chosen reward beats the rejected one, as TRL's
    ``rewards/accuracies``), ``reward_margin`` (``beta * delta``), ``chosen_logps`` and
    ``rejected_logps`` (the policy's sequence log-probs).
    """

    def __init__(self, model: torch.nn.Module, config: DPOConfig, *, real_vocab: int | None = None):
        super().__init__()
        self.model = model
        self.config = config
        self.real_vocab = real_vocab

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor,
                sequence_ids: torch.Tensor, ref_logps: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits
        policy, pair_mask = sequence_sums(token_logps(mask_padded_logits(logits, self.real_vocab), labels,
                                                      position_ids), sequence_ids)
        reference, _ = sequence_sums(ref_logps.float(), sequence_ids)
        num_tokens, _ = sequence_sums(_target_mask(labels, position_ids), sequence_ids)
        c = self.config
        losses = dpo_loss(policy[..., 0], policy[..., 1], reference[..., 0], reference[..., 1], beta=c.beta,
                          loss=c.loss, label_smoothing=c.label_smoothing, chosen_tokens=num_tokens[..., 0],
                          rejected_tokens=num_tokens[..., 1])
        if c.sft_weight:  # RPO: plus the chosen answer's mean token NLL
            losses = losses - c.sft_weight * policy[..., 0] / num_tokens[..., 0].clamp(min=1)
        with torch.no_grad():
            rewards = c.beta * (policy - reference)
            margin = rewards[..., 0] - rewards[..., 1]
        keep = pair_mask.float()
        return {"loss": (losses * keep).sum(),
                "reward_accuracy": ((margin > 0).float() * keep).sum(),
                "reward_margin": (margin * keep).sum(),
                "chosen_logps": (policy[..., 0].detach() * keep).sum(),
                "rejected_logps": (policy[..., 1].detach() * keep).sum()}


def num_pairs(sequence_ids: torch.Tensor) -> int:
    """Pairs in a batch of pair rows (each chosen sequence starts one)."""
    return int(((sequence_ids.max(dim=1).values + 1) // 2).sum())


class DPOObjective:
    """The ``dpo`` training objective (see ``steps.objectives``): the mean DPO loss over a step's pairs."""

    columns = ("input_ids", "labels", "position_ids", "sequence_ids", "ref_logps")

    def __init__(self, recipe: Recipe, inputs: dict | None = None, device: torch.device | None = None):
        self.config = recipe.dpo  # the reference log-probs come with the rows: no model to load

    def collate(self, rows: Sequence[dict], row_tokens: int, pad_id: int) -> dict[str, torch.Tensor]:
        return collate_pair_rows(rows, row_tokens, pad_id)

    def count(self, step_batch: dict[str, torch.Tensor]) -> int:
        return num_pairs(step_batch["sequence_ids"])

    def module(self, model: torch.nn.Module, *, real_vocab: int | None,
               chunk_tokens: int | None) -> torch.nn.Module:
        if chunk_tokens:
            # Not implemented for DPO yet: it would need per-token log-probs from hidden states in chunks.
            warn_ignored("train.chunked_ce", "the dpo objective computes the full logits")
        return DPOLoss(model, self.config, real_vocab=real_vocab)


# ---------------------------------------------------------------------------------------------
# Evaluation: held-out pairs, then the SFT task metrics (steps.evaluate)
# ---------------------------------------------------------------------------------------------

def preference_metrics(model, token_uris: list[str], *, row_tokens: int, pad_id: int, batch_rows: int = 8,
                       config: DPOConfig) -> dict:
    """DPO loss, reward accuracy and margin, and the chosen / rejected log-probs on held-out pair rows.

    The same :class:`DPOLoss` as training, averaged over every held-out pair. The reference is the
    one whose log-probs the rows carry, so the starting policy scores ``reward_accuracy`` 0 and
    ``dpo_loss`` log 2 (sigmoid): every reward is 0.
    """
    loss_module = DPOLoss(model, config)
    rows = [row for uri in token_uris for row in pq.read_table(uri).to_pylist()]
    sums: Counter[str] = Counter()
    num = 0
    with torch.no_grad():
        for chunk in _batches(rows, batch_rows):
            batch = collate_pair_rows(chunk, row_tokens, pad_id)
            num += num_pairs(batch["sequence_ids"])
            for name, value in loss_module(**batch).items():
                sums[name] += float(value)
    if num == 0:
        raise ValueError(f"no pairs in the eval token shards {list(token_uris)}")
    return {"dpo_loss": sums.pop("loss") / num, **{name: value / num for name, value in sums.items()},
            "num_eval_pairs": num}


def heldout_metrics(recipe: Recipe):
    """The held-out part of a DPO evaluation (``heldout=`` of ``steps.evaluate.evaluate_target``):
    :func:`preference_metrics` on the held-out pairs, instead of the SFT held-out loss."""
    import functools

    return functools.partial(preference_metrics, config=recipe.dpo)


# ---------------------------------------------------------------------------------------------
# The starting policy
# ---------------------------------------------------------------------------------------------

def starting_models(recipe: Recipe, run_root: str) -> dict:
    """The policy to train and the reference to compare with, for the flow's ``start`` step.

    Returns ``{"policy_path", "reference_path", "parent"}`` where ``parent`` is the registry
    version the policy came from (None for ``model.base``).
    """
    from steps.models import resolve_model_ref

    policy_path, parent = resolve_model_ref(recipe.dpo.policy, recipe, Path(run_root) / "policy", field="dpo.policy",
                                            fall_back_to_base=True)
    reference_path = policy_path
    if recipe.dpo.reference is not None:
        reference_path, _ = resolve_model_ref(recipe.dpo.reference, recipe, Path(run_root) / "reference",
                                              field="dpo.reference")
    return {"policy_path": policy_path, "reference_path": reference_path, "parent": parent}


PREFERENCE_METRICS = ("reward_accuracy", "reward_margin", "dpo_loss", "chosen_logps", "rejected_logps")
"""DPO's held-out metrics (on the held-out pairs), shown after the task metrics in cards and summaries."""
