"""Scoring a checkpoint: held-out loss, perplexity, assistant-token accuracy and task metrics.

Two kinds of numbers per checkpoint:

- ``heldout_loss``: teacher-forced cross-entropy over the packed eval token shards, on the
  trained (assistant) tokens only, with the same loss function as training
  (``steps.losses``), so ``eval_loss`` and the train curve are comparable.
- ``task_metrics``: greedy answers to held-out requests, scored by evaluators
  (``builtin:catalog`` or any ``package.module:function`` taking ``(records, answers)``).

``evaluate_model`` runs both on one model folder and returns one flat dict::

    {"eval_loss": 2.31, "perplexity": 10.07, "assistant_token_accuracy": 0.52, "num_eval_tokens": 41230,
     "task_score": 0.64, ..., "num_task_prompts": 200}

The row also holds ``per_request``: the recipe's ``evaluate.select_metric`` of each answer
alone (when the evaluators return that metric), so two models scored on the same requests can
be compared pairwise (``paired_difference``; the run summary prints it against the base model).

``select_best`` then picks the best row of such dicts by the recipe's metric.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from steps.contracts import BASELINE_ROW, row_step

# torch and the model code are imported where they are used: plan_evaluation and join_evaluate
# (eval_targets, select_best) then start without importing torch (~2 s of CPU each).

Evaluator = Callable[[list[dict], list[str]], dict[str, float]]
"""``(records, answers) -> metrics``; records carry ``messages`` and a parsed ``meta`` dict."""



# ---------------------------------------------------------------------------------------------
# Held-out loss
# ---------------------------------------------------------------------------------------------

def _iter_token_rows(token_uris: Sequence[str]) -> Iterator[dict[str, list[int]]]:
    """Packed rows of the shards, in shard order then row order."""
    columns = ["input_ids", "labels", "position_ids"]
    for uri in token_uris:
        for record_batch in pq.ParquetFile(uri).iter_batches(columns=columns):
            values = record_batch.to_pydict()
            for input_ids, labels, position_ids in zip(*(values[c] for c in columns), strict=True):
                yield {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


def _chunks(items: Iterator[Any], size: int) -> Iterator[list[Any]]:
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def heldout_loss(model, token_uris: list[str], *, row_tokens: int, pad_id: int, batch_rows: int = 8) -> dict:
    """Mean cross-entropy and accuracy over the trained tokens of packed eval shards.

    Rows are padded to ``row_tokens`` (``steps.packing.collate_rows``: pad id, label -100,
    positions restarting at 0) and run with ``position_ids`` and no attention mask, so every
    packed document attends only to itself. Logits at ``i`` predict the label at ``i + 1``;
    the first token of each document is never a target (``steps.losses.shifted_targets``).
    The loss is summed over every target token of every row, then divided once by their
    number: a token-weighted mean, not a mean of per-row means::

        row          [a b c | d e]       labels [- b c | - e]      (- = -100)
        targets      a->b, b->c, d->e    (c->d crosses documents: masked)
        eval_loss    (ce(a->b) + ce(b->c) + ce(d->e)) / 3
        perplexity   exp(eval_loss)

    Returns ``{"eval_loss", "perplexity", "assistant_token_accuracy", "num_eval_tokens"}``, where
    ``assistant_token_accuracy`` is the share of targets (the trained, assistant tokens) whose
    argmax logit is the label.
    """
    import torch

    from steps.losses import IGNORE_INDEX, shifted_targets, token_loss_sum
    from steps.packing import collate_rows

    if batch_rows < 1:
        raise ValueError(f"batch_rows must be >= 1, got {batch_rows}")
    device = next(model.parameters()).device
    loss_sum = 0.0
    num_correct = 0
    num_tokens = 0
    with torch.no_grad():
        for rows in _chunks(_iter_token_rows(token_uris), batch_rows):
            batch = collate_rows(rows, row_tokens, pad_id)
            batch = {name: values.to(device) for name, values in batch.items()}
            # use_cache=False matters: with a cache, transformers does not build the packed
            # (document-isolated) mask from position_ids.
            logits = model(
                input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                attention_mask=None, use_cache=False,
            ).logits
            targets = shifted_targets(batch["labels"], batch["position_ids"])
            is_target = targets != IGNORE_INDEX
            loss_sum += float(token_loss_sum(logits, batch["labels"], batch["position_ids"]).double())
            num_correct += int((logits[:, :-1].argmax(dim=-1)[is_target] == targets[is_target]).sum())
            num_tokens += int(is_target.sum())
    if num_tokens == 0:
        raise ValueError(f"no trained tokens in the eval token shards {list(token_uris)}")
    eval_loss = loss_sum / num_tokens
    return {
        "eval_loss": eval_loss,
        "perplexity": math.exp(eval_loss) if eval_loss < 700 else math.inf,  # exp overflows past ~709
        "assistant_token_accuracy": num_correct / num_tokens,
        "num_eval_tokens": num_tokens,
    }


# ---------------------------------------------------------------------------------------------
# Greedy generation
# ---------------------------------------------------------------------------------------------

def _eos_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends an answer: the tokenizer's eos and the model's generation eos ids."""
    ids = []
    for value in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        for token_id in value if isinstance(value, (list, tuple)) else [value]:
            if token_id is not None and int(token_id) not in ids:
                ids.append(int(token_id))
    if not ids:
        raise ValueError("neither the tokenizer nor the model's generation config names an eos token")
    return ids


def generate_greedy(
    model, tokenizer, prompts: list[list[dict]], *, max_new_tokens: int, batch_size: int
) -> list[str]:
    """Greedy answers to chat ``prompts``, batched, in the order of ``prompts``.

    Each prompt is rendered with the tokenizer's chat template plus the generation prompt
    (tokenized once, special tokens as the template writes them), then prompts are sorted
    longest first and cut into batches of ``batch_size`` so each batch pads little. Batches
    are LEFT-padded (the new tokens of every row then start at the same column) with an
    attention mask; ``generate`` derives the positions from that mask, so a padded prompt
    gets exactly the greedy answer it gets alone. Only the new tokens are decoded, without
    special tokens, and stripped::

        prompts (tokens)   p0 = [u u u]   p1 = [u u u u u]          batch_size 2
        batch              [pad pad u u u]  -> generate -> [... a a <eos>] -> "a a"
                           [u   u   u u u]

    The tokenizer is not modified (padding is done here, not with ``padding_side``).
    """
    return [answers[0] for answers in generate_answers(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                                       batch_size=batch_size)]


def generate_answers(
    model, tokenizer, prompts: list[list[dict]], *, max_new_tokens: int, batch_size: int,
    num_samples: int = 1, temperature: float = 0.0, seed: int = 0,
) -> list[list[str]]:
    """``num_samples`` answers to each of ``prompts``: greedy (``temperature`` 0) or sampled.

    Batched as :func:`generate_greedy` describes (which is this with one greedy answer).
    Sampling draws from the model's softmax at ``temperature`` (no top-k / top-p), seeded with
    ``seed`` once before the first batch, so the same call gives the same answers. Returns one
    list of ``num_samples`` answers per prompt, in the order of ``prompts``.
    """
    import torch

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_samples < 1 or temperature < 0 or (num_samples > 1 and temperature == 0):
        raise ValueError(f"need num_samples >= 1 and temperature >= 0, and temperature > 0 for several samples; "
                         f"got num_samples={num_samples}, temperature={temperature}")
    eos_ids = _eos_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    device = next(model.parameters()).device
    prompt_ids = [
        list(tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"])
        for messages in prompts
    ]
    order = sorted(range(len(prompts)), key=lambda index: (-len(prompt_ids[index]), index))
    answers: list[list[str]] = [[] for _ in prompts]
    sampling = {"do_sample": True, "temperature": temperature, "top_k": None, "top_p": None,
                "num_return_sequences": num_samples} if temperature > 0 else {"do_sample": False}
    if temperature > 0:
        torch.manual_seed(seed)
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            indices = order[start:start + batch_size]
            width = max(len(prompt_ids[i]) for i in indices)
            input_ids = torch.full((len(indices), width), pad_id, dtype=torch.long)
            attention_mask = torch.zeros((len(indices), width), dtype=torch.long)
            for row, index in enumerate(indices):
                ids = prompt_ids[index]
                input_ids[row, width - len(ids):] = torch.as_tensor(ids, dtype=torch.long)
                attention_mask[row, width - len(ids):] = 1
            output = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                **sampling,
                use_cache=True,
                max_new_tokens=max_new_tokens,
                pad_token_id=pad_id,
                eos_token_id=eos_ids,
            )
            for row, index in enumerate(indices):
                for sample in range(num_samples):  # generate() returns a prompt's samples side by side
                    new_tokens = output[row * num_samples + sample, width:].tolist()
                    answers[index].append(tokenizer.decode(new_tokens, skip_special_tokens=True).strip())
    return answers


# ---------------------------------------------------------------------------------------------
# Task metrics
# ---------------------------------------------------------------------------------------------

def load_evaluator(spec: str) -> Evaluator:
    """Resolve an evaluator spec: ``builtin:NAME`` or ``package.module:function``.

    Example:
        >>> load_evaluator("builtin:catalog").__name__
        'evaluate'
        >>> load_evaluator("json:dumps") is json.dumps
        True
        >>> load_evaluator("catalog")
        Traceback (most recent call last):
        ...
        ValueError: evaluator spec 'catalog' must be 'builtin:NAME' or 'package.module:function'
    """
    if not isinstance(spec, str) or spec.count(":") != 1:
        raise ValueError(f"evaluator spec {spec!r} must be 'builtin:NAME' or 'package.module:function'")
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"evaluator spec {spec!r} must be 'builtin:NAME' or 'package.module:function'")
    if module_name == "builtin":
        from steps.builtin import builtin_evaluator

        return builtin_evaluator(attribute)
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(
            f"evaluator spec {spec!r}: cannot import module {module_name!r} ({error})"
        ) from error
    function = getattr(module, attribute, None)
    if not callable(function):
        raise ValueError(f"evaluator spec {spec!r}: module {module_name!r} has no callable {attribute!r}")
    return function


def scorers_of(evaluators: Sequence[str]) -> str:
    """The evaluators as the registry records them: ``spec@version`` (or ``spec``), comma-separated.

    The gate compares two versions' metrics only when these are equal too, so a change to an
    evaluator's numbers (its ``version`` attribute) is never mistaken for a better model.

    Example:
        >>> scorers_of(["builtin:catalog", "json:dumps"])
        'builtin:catalog@2,json:dumps'
    """
    labels = []
    for spec in evaluators:
        version = getattr(load_evaluator(spec), "version", None)
        labels.append(spec if version is None else f"{spec}@{version}")
    return ",".join(labels)


def _read_task_records(data_uris: Sequence[str], num_prompts: int) -> list[dict]:
    """The first ``num_prompts`` records (shard order, then row order) whose meta is not empty."""
    records: list[dict] = []
    for uri in data_uris:
        for record_batch in pq.ParquetFile(uri).iter_batches():
            for row in record_batch.to_pylist():
                meta = row.get("meta") or {}
                meta = json.loads(meta) if isinstance(meta, str) else meta
                if meta:
                    records.append({**row, "meta": meta})
                    if len(records) == num_prompts:
                        return records
    return records


def task_metrics(
    model,
    tokenizer,
    data_uris: list[str],
    evaluators: list[str],
    *,
    num_prompts: int,
    max_new_tokens: int,
    batch_size: int,
    per_request_metric: str | None = None,
) -> dict:
    """Generate greedy answers to held-out requests and score them with every evaluator.

    The requests are the first ``num_prompts`` eval records with a non-empty ``meta``; each
    prompt is the conversation up to its final assistant turn (``task_prompt``). Every
    evaluator gets the same ``(records, answers)``; their dicts are merged (a metric name
    two evaluators both return is an error), plus ``num_task_prompts``. With
    ``per_request_metric`` (a metric that is a mean over requests, such as ``task_score``), the
    dict also holds ``per_request``: that metric of each answer alone (:func:`answer_scores`), in
    request order, for paired comparisons (:func:`paired_difference`).
    """
    from steps.builtin.catalog import task_prompt

    loaded = [load_evaluator(spec) for spec in evaluators]  # fail on a bad spec before generating
    if not loaded or num_prompts <= 0:
        return {}
    records = _read_task_records(data_uris, num_prompts)
    if not records:
        warnings.warn(
            f"no eval record with task metadata in {list(data_uris)}: no task metrics", stacklevel=2
        )
        return {"num_task_prompts": 0}
    prompts = [task_prompt(record) for record in records]
    answers = generate_greedy(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    metrics: dict[str, float] = {}
    for spec, evaluator in zip(evaluators, loaded, strict=True):
        scores = evaluator(records, answers)
        _merge_into(metrics, scores, source=f"evaluator {spec!r}")
    _merge_into(metrics, {"num_task_prompts": len(records)}, source="task_metrics")
    if per_request_metric is not None and per_request_metric in metrics:
        metrics["per_request"] = {"metric": per_request_metric,
                                  "scores": answer_scores(loaded, per_request_metric, records, answers)}
    return metrics


def paired_difference(base: Sequence[float], model: Sequence[float]) -> dict:
    """How ``model`` differs from ``base`` on the same requests: the mean difference of their per-request
    scores with a 95% normal interval (``1.96 * sd / sqrt(n)`` of the differences), and how many
    requests got better or worse. Pairing removes the requests' own difficulty from the noise.

    Example:
        >>> p = paired_difference([1, 0, 0, 1], [1, 1, 1, 0])  # differences 0, 1, 1, -1
        >>> p["difference"], round(p["ci95"], 4), p["better"], p["worse"]   # 1.96 * 0.9574 / sqrt(4)
        (0.25, 0.9383, 2, 1)
    """
    if len(base) != len(model) or not base:
        raise ValueError(f"need the same, non-zero number of requests; got {len(base)} and {len(model)}")
    diffs = [float(m) - float(b) for b, m in zip(base, model, strict=True)]
    mean = sum(diffs) / len(diffs)
    variance = sum((d - mean) ** 2 for d in diffs) / max(len(diffs) - 1, 1)
    return {"num_requests": len(diffs), "difference": mean, "ci95": 1.96 * math.sqrt(variance / len(diffs)),
            "better": sum(d > 0 for d in diffs), "worse": sum(d < 0 for d in diffs)}


def answer_scores(evaluators: Sequence, metric: str, records: Sequence[dict], answers: Sequence[str]) -> list[float]:
    """Each answer's ``metric`` on its own: every evaluator scores ``([record], [answer])``.

    The evaluator API is ``(records, answers) -> metrics``; on one record, a metric that is a
    mean over records (the catalog's ``task_score``) is that answer's score.
    """
    scores = []
    for record, answer in zip(records, answers, strict=True):
        merged: dict = {}
        for evaluator in evaluators:
            merged.update(evaluator([record], [answer]))
        if metric not in merged:
            raise ValueError(f"answers are judged one by one by {metric!r}, which the evaluators do not "
                             f"return (they return {sorted(merged)})")
        scores.append(float(merged[metric]))
    return scores


def _merge_into(target: dict, new: Mapping[str, Any], *, source: str) -> None:
    clashes = sorted(set(target) & set(new))
    if clashes:
        raise ValueError(
            f"{source} returns metric(s) {clashes} that another part of the evaluation already set"
        )
    target.update(new)


# ---------------------------------------------------------------------------------------------
# One model, and the choice among checkpoints
# ---------------------------------------------------------------------------------------------

def evaluate_model(model_dir: str | Path, *, token_uris: list[str], data_uris: list[str], recipe,
                   heldout: Callable[..., dict] = heldout_loss) -> dict:
    """Load a model folder (safetensors, fp32, CPU, eval mode) and return all its metrics, flat.

    Rows are batched as in training: ``train.micro_batch_tokens // tokenize.max_seq_tokens``.
    ``heldout(model, token_uris, row_tokens=, pad_id=, batch_rows=)`` scores the eval token
    shards: :func:`heldout_loss` for SFT, ``steps.dpo.preference_metrics`` for preference pairs.
    Thread counts are left to the caller.
    """
    import torch

    from steps.models import load_model, load_tokenizer

    trust_remote_code = recipe.model.trust_remote_code
    # Evaluation runs on CPU, where flash kernels do not exist; sdpa and eager give the same numbers.
    attn_implementation = "eager" if recipe.model.attn_implementation == "eager" else "sdpa"
    tokenizer = load_tokenizer(model_dir, trust_remote_code)
    model = load_model(model_dir, trust_remote_code, attn_implementation, dtype=torch.float32)
    model = model.to("cpu").eval()
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = _eos_token_ids(model, tokenizer)[0]
    row_tokens = recipe.tokenize.max_seq_tokens
    metrics = heldout(
        model, token_uris, row_tokens=row_tokens, pad_id=pad_id,
        batch_rows=max(1, recipe.train.micro_batch_tokens // row_tokens),
    )
    task = task_metrics(
        model, tokenizer, data_uris, recipe.evaluate.evaluators,
        num_prompts=recipe.evaluate.num_task_prompts,
        max_new_tokens=recipe.evaluate.max_new_tokens,
        batch_size=recipe.evaluate.generation_batch_size,
        per_request_metric=recipe.evaluate.select_metric,
    )
    _merge_into(metrics, task, source="task_metrics")
    return metrics


def select_best(rows: list[dict], metric: str, mode: str) -> dict:
    """The row with the best ``metric`` (``mode`` "max" or "min"); ties go to the later step.

    The step comes from a row's ``step`` key or the ``step-K`` end of its ``checkpoint``;
    rows without one count as earliest, and among equal steps the later row wins. NaN never wins.

    Example:
        >>> rows = [{"checkpoint": "step-000100", "task_score": 0.5},
        ...         {"checkpoint": "step-000200", "task_score": 0.7},
        ...         {"checkpoint": "step-000300", "task_score": 0.7}]
        >>> select_best(rows, "task_score", "max")["checkpoint"]
        'step-000300'
        >>> select_best(rows, "task_score", "min")["checkpoint"]
        'step-000100'
    """
    if mode not in ("max", "min"):
        raise ValueError(f"select mode must be 'max' or 'min', got {mode!r}")
    if not rows:
        raise ValueError(f"no rows to select the best {metric!r} from")
    for row in rows:
        if metric not in row:
            raise ValueError(
                f"metric {metric!r} missing from the row of checkpoint {row.get('checkpoint')!r} "
                f"(it has: {', '.join(sorted(row))})"
            )
    candidates = [(index, row) for index, row in enumerate(rows) if not math.isnan(float(row[metric]))]
    if not candidates:
        raise ValueError(f"metric {metric!r} is NaN in every row")
    sign = 1.0 if mode == "max" else -1.0
    _, best = max(candidates, key=lambda item: (sign * float(item[1][metric]), row_step(item[1]), item[0]))
    return best


# ---------------------------------------------------------------------------------------------
# The flow's evaluate step (foreach target)
# ---------------------------------------------------------------------------------------------

def eval_targets(recipe, base_model_path: str | Path, checkpoints: list[str]) -> list[dict]:
    """What the evaluate foreach scores: the base model (if ``evaluate.eval_baseline``) and each checkpoint.

    Example:
        >>> from steps.config import Recipe
        >>> for target in eval_targets(Recipe(), "/m/base", ["/r/checkpoints/step-000100"]):
        ...     print(target)
        {'checkpoint': 'base', 'path': '/m/base'}
        {'checkpoint': 'step-000100', 'path': '/r/checkpoints/step-000100', 'step': 100}
    """
    targets = []
    if recipe.evaluate.eval_baseline:
        targets.append({"checkpoint": BASELINE_ROW, "path": str(base_model_path)})
    return targets + [{"checkpoint": Path(path).name, "path": str(path), "step": row_step({"checkpoint": Path(path).name})}
                      for path in checkpoints]


def evaluate_target(
    recipe,
    target: dict,
    dataset_manifest: dict,
    token_stats: dict,
    run_root: str,
    *,
    num_parallel_tasks: int = 1,
    heldout: Callable[..., dict] = heldout_loss,
) -> dict:
    """Score one target of ``eval_targets`` and write ``<run_root>/eval/<checkpoint>.json``.

    Parallel foreach tasks share the machine, so each takes ``cpu_count // num_parallel_tasks``
    torch threads. Returns the row ``{"checkpoint", "path", **metrics}``.
    """
    import torch

    from steps import storage

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, num_parallel_tasks)))
    metrics = evaluate_model(
        target["path"],
        token_uris=token_stats["eval"]["uris"],
        data_uris=dataset_manifest["splits"]["eval"]["uris"],
        recipe=recipe,
        heldout=heldout,
    )
    row = {"checkpoint": target["checkpoint"], "path": target["path"],
           **({"step": target["step"]} if "step" in target else {}), **metrics}
    out_path = storage.subdir(run_root, "eval") / f"{target['checkpoint']}.json"
    out_path.write_text(json.dumps(row, indent=2, sort_keys=True) + "\n")
    return row
