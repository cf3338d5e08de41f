"""The recipe: a tree of dataclasses, loaded from YAML (or a dict), validated on construction.

Every field has a default, so an empty recipe is the embedded default. Unknown keys and bad
values raise ``RecipeError`` (a ``ValueError``) naming the field by its dotted path::

    >>> recipe_from_dict({"train": {"lr": -1}})
    Traceback (most recent call last):
    steps.config.RecipeError: recipe field 'train.lr' must be > 0, got -1.0
    >>> recipe_from_dict({"trian": {}})  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    steps.config.RecipeError: recipe has unknown field 'trian' (known: data, distill, dpo, evaluate, ...)
"""

from __future__ import annotations

import contextvars
import dataclasses
import math
import os
import re
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class RecipeError(ValueError):
    """A recipe field is unknown or holds a bad value. The message names the field, one line per
    problem (``problems``), every problem of the recipe at once."""

    def __init__(self, problems: str | list[str]):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


# While a recipe is validated, every problem found is appended here (instead of raising at the
# first), so that a user sees all of them at once.
_PROBLEMS: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("recipe_problems", default=None)
_INVALID = object()  # what a field that failed coercion becomes: its default is used meanwhile
_MAX_SHOWN_CHARS = 80


def _short(value: Any) -> str:
    """``repr(value)``, cut to a few dozen characters: an error message never holds a whole
    (possibly huge) value."""
    text = repr(value)
    return text if len(text) <= _MAX_SHOWN_CHARS else f"{text[:_MAX_SHOWN_CHARS - 15]}... ({len(text)} chars)"


def _report(message: str) -> None:
    problems = _PROBLEMS.get()
    if problems is None:
        raise RecipeError(message)
    problems.append(message)


def _check(ok: bool, path: str, requirement: str, value: Any) -> None:
    if not ok:
        _report(f"recipe field '{path}' must be {requirement}, got {_short(value)}")


@dataclass(kw_only=True, slots=True)
class ModelConfig:
    base: str = "builtin:tiny-llama"
    """Base model: ``builtin:tiny-llama`` (built offline), a local folder, a Hugging Face id, or a
    registered model, ``registry:NAME[@VERSION_OR_ALIAS]`` (downloaded, checksums verified, and
    recorded as the run's ``lineage.parent``)."""
    trust_remote_code: bool = False
    """Run model code shipped with the checkpoint. Off unless you trust the source."""
    attn_implementation: str = "auto"
    """Attention kernel passed to transformers: ``auto`` (``sdpa`` on CPU; on GPU
    ``flash_attention_2`` if the flash-attn package is installed, else ``flex_attention``: both
    keep packed documents apart without materializing a mask), ``sdpa``, ``eager``,
    ``flash_attention_2`` or ``flex_attention``. See ``steps.models.resolve_attn_implementation``."""

    def validate(self, path: str) -> None:
        _check(bool(self.base.strip()), f"{path}.base", "a non-empty model name", self.base)
        _check(
            self.attn_implementation in ("auto", "sdpa", "eager", "flash_attention_2", "flex_attention"),
            f"{path}.attn_implementation",
            "one of auto, sdpa, eager, flash_attention_2, flex_attention",
            self.attn_implementation,
        )


@dataclass(kw_only=True, slots=True)
class SourceConfig:
    uri: str
    """``builtin:catalog``; a local path or ``s3://`` URI of JSONL (``.gz`` too) or Parquet (a file or
    a folder / prefix of them); or a local folder saved by ``datasets``."""
    weight: float = 1.0
    """Times each training conversation of this source is taken: 2.0 = twice, 0.5 = a hash-chosen
    half (``steps.ingest.num_copies``), at most 100. An eval conversation is taken at most once."""
    allow_empty: bool = False
    """Let this source yield no record at all; by default that fails ingest, naming the source
    (an empty source is usually a typo in a path or a folder of other files)."""

    def validate(self, path: str) -> None:
        _check(bool(self.uri.strip()), f"{path}.uri", "a non-empty URI", self.uri)
        _check(0 < self.weight <= MAX_SOURCE_WEIGHT, f"{path}.weight", f"in (0, {MAX_SOURCE_WEIGHT}]", self.weight)

    def missing_local_path(self, path: str) -> str | None:
        """The problem of a local source that does not exist (None for builtin:, s3:// and paths
        that exist): caught when the recipe is read, not minutes later in the ingest task."""
        if self.uri.startswith(("builtin:", "s3://")) or Path(self.uri).expanduser().exists():
            return None
        return (f"recipe field '{path}.uri' names no file or folder: {_short(self.uri)} (a relative path is "
                f"read from {Path.cwd()})")


MAX_SOURCE_WEIGHT = 100.0
"""Up-weighting beyond this is a typo (``weight: 1e9`` would write shards until the disk fills)."""


@dataclass(kw_only=True, slots=True)
class DataConfig:
    sources: list[SourceConfig] = field(default_factory=lambda: [SourceConfig(uri="builtin:catalog")])
    """Where the conversations come from."""
    builtin_num_conversations: int = 12000
    """How many conversations ``builtin:catalog`` generates."""
    eval_fraction: float = 0.05
    """Share of conversations held out for evaluation, chosen by a hash of their content."""
    max_reject_fraction: float = 0.05
    """Fail ingest if more than this share of records is invalid."""
    max_record_bytes: int = 1_000_000
    """Records larger than this (serialized) are rejected as oversize."""
    records_per_shard: int = 50_000
    """Conversations per Parquet shard."""

    def validate(self, path: str) -> None:
        _check(len(self.sources) > 0, f"{path}.sources", "a non-empty list", self.sources)
        _check(self.builtin_num_conversations <= 10_000_000, f"{path}.builtin_num_conversations",
               "at most 10,000,000", self.builtin_num_conversations)
        for i, source in enumerate(self.sources):
            source.validate(f"{path}.sources[{i}]")
        _check(self.builtin_num_conversations > 0, f"{path}.builtin_num_conversations", "> 0",
               self.builtin_num_conversations)
        _check(0 < self.eval_fraction < 1, f"{path}.eval_fraction", "in (0, 1)", self.eval_fraction)
        _check(0 <= self.max_reject_fraction <= 1, f"{path}.max_reject_fraction", "in [0, 1]",
               self.max_reject_fraction)
        _check(self.max_record_bytes > 0, f"{path}.max_record_bytes", "> 0", self.max_record_bytes)
        _check(self.records_per_shard > 0, f"{path}.records_per_shard", "> 0", self.records_per_shard)


@dataclass(kw_only=True, slots=True)
class TokenizeConfig:
    max_seq_tokens: int = 256
    """Length of a packed row, and so the longest conversation that is kept."""
    truncation: Literal["drop", "turn"] = "drop"
    """Over-long conversations: ``drop`` them, or cut at the last assistant turn that fits."""
    max_reject_fraction: float = 0.01
    """Fail tokenize if the chat template rejects more than this share of conversations
    (e.g. roles that do not alternate); below it they are skipped and counted by reason."""
    num_workers: int = 1
    """Processes that render and label conversations (1 = this one, 0 = one per CPU). Rows are
    the same for any number."""

    def validate(self, path: str) -> None:
        _check(self.max_seq_tokens >= 8, f"{path}.max_seq_tokens", ">= 8", self.max_seq_tokens)
        _check(self.truncation in ("drop", "turn"), f"{path}.truncation", "'drop' or 'turn'",
               self.truncation)
        _check(0 <= self.max_reject_fraction <= 1, f"{path}.max_reject_fraction", "in [0, 1]",
               self.max_reject_fraction)
        _check(self.num_workers >= 0, f"{path}.num_workers", ">= 0", self.num_workers)


@dataclass(kw_only=True, slots=True)
class LoraConfig:
    rank: int = 8
    """Rank r of the low-rank update ``B @ A``."""
    alpha: float = 16.0
    """Scale of the update is ``alpha / rank``."""
    dropout: float = 0.0
    """Dropout on the adapter's input."""
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    """Names of the linear layers that get an adapter."""

    def validate(self, path: str) -> None:
        _check(self.rank > 0, f"{path}.rank", "> 0", self.rank)
        _check(self.alpha > 0, f"{path}.alpha", "> 0", self.alpha)
        _check(0 <= self.dropout < 1, f"{path}.dropout", "in [0, 1)", self.dropout)
        _check(len(self.target_modules) > 0, f"{path}.target_modules", "a non-empty list",
               self.target_modules)


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    num_nodes: int = 1
    """Metaflow @parallel nodes; each runs torchrun with nproc_per_node ranks."""
    nproc_per_node: int = 1
    """torchrun ranks per node (GPUs per node on GPU machines)."""
    strategy: Literal["ddp", "fsdp2", "deepspeed_zero2", "deepspeed_zero3"] = "ddp"
    """Data-parallel strategy: ``ddp`` (replicated), ``fsdp2`` (``fully_shard`` per decoder layer;
    optimizer state saved sharded with torch DCP), ``deepspeed_zero2`` / ``deepspeed_zero3``
    (DeepSpeed ZeRO stage 2 / 3, its own sharded checkpoint files; ``pip install .[deepspeed]``)."""
    finetune: Literal["full", "lora"] = "full"
    """``full`` fine-tuning, or ``lora`` adapters (peft); checkpoints then hold the adapter only."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """Adapter settings, used when ``finetune`` is ``lora``."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward (less memory, about a third more compute)."""
    micro_batch_tokens: int = 4096
    """Tokens per packed micro-batch on one rank (a multiple of tokenize.max_seq_tokens)."""
    global_batch_tokens: int = 4096
    """Tokens per optimizer step over all ranks; gradient accumulation is derived from it."""
    max_steps: int = 400
    """Optimizer steps to run. The data is repeated (reshuffled per epoch) if needed."""
    lr: float = 2e-3
    """Peak learning rate of AdamW."""
    min_lr_ratio: float = 0.1
    """The cosine schedule decays to lr * min_lr_ratio."""
    warmup_steps: int = 20
    """Linear warmup steps before the cosine decay."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 disables)."""
    save_every_steps: int = 100
    """Write a checkpoint every this many steps (and always at the last step)."""
    log_every_steps: int = 10
    """Print loss, tokens/s and ETA every this many steps."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Compute dtype: ``auto`` is fp32 on CPU and bf16 autocast on GPU."""
    num_threads: int = 0
    """torch intra-op threads per rank on CPU (0 = cores / local ranks)."""
    rendezvous_timeout_s: int = 300
    """With ``num_nodes`` > 1: how long the nodes wait for each other at the start of training. A
    node that never starts (crashed before torchrun, pod never scheduled) fails the others after
    this long, naming how many nodes joined. Once training runs, a dead peer fails the step within
    the 60 s collective timeout instead."""
    chunked_ce: Literal["auto", "on", "off"] = "auto"
    """Compute the LM head and cross-entropy in chunks of ``ce_chunk_tokens`` trained tokens, so
    the ``[tokens, vocab]`` logits are never materialized (``steps.losses.chunked_token_loss_sum``).
    ``auto``: on on GPU, off on CPU (where the plain loss is faster for small vocabularies)."""
    ce_chunk_tokens: int = 4096
    """Trained tokens per chunk of the chunked cross-entropy."""
    compile: bool = False
    """``torch.compile`` each decoder layer before wrapping (as torchtitan does). On an H100 it
    took a 0.5B Llama from 19.8% to 27.5% MFU (docs/benchmarks.md); the first steps pay the
    compilation. Not with DeepSpeed."""
    pad_vocab_multiple: int = 0
    """Pad the embedding and LM head to a multiple of this many rows while training (64 keeps the
    LM-head matmul on the fast tensor-core kernels); the padded rows are never predicted and the
    saved checkpoints have the real vocabulary size. 0 = no padding."""
    keep_last: int = 0
    """Keep the resume state (optimizer, scheduler, RNG) of only the newest this many checkpoints
    (0 keeps all). Older checkpoints keep their weights, which evaluation scores after training;
    only their resume state, 2-3x the size of the weights, is deleted."""
    resume_from: str | None = None
    """A checkpoint folder, or a run root / checkpoint root, whose latest complete checkpoint a
    fresh run starts from (weights, optimizer, scheduler, data position, RNG)."""
    fail_at_step: int | None = None
    """Failure injection for tests: raise after this optimizer step (before it is saved). It fires
    once per checkpoint root, so a retried or resumed step gets past it."""
    kill_rank_at_step: int | None = None
    """Failure injection for tests: the last rank dies (SIGKILL) after this optimizer step."""

    def validate(self, path: str) -> None:
        for name in ("num_nodes", "nproc_per_node", "micro_batch_tokens", "global_batch_tokens",
                     "max_steps", "save_every_steps", "log_every_steps"):
            _check(getattr(self, name) > 0, f"{path}.{name}", "> 0", getattr(self, name))
        _check(self.strategy in ("ddp", "fsdp2", "deepspeed_zero2", "deepspeed_zero3"), f"{path}.strategy",
               "'ddp', 'fsdp2', 'deepspeed_zero2' or 'deepspeed_zero3'", self.strategy)
        _check(self.finetune in ("full", "lora"), f"{path}.finetune", "'full' or 'lora'", self.finetune)
        _check(self.chunked_ce in ("auto", "on", "off"), f"{path}.chunked_ce", "'auto', 'on' or 'off'",
               self.chunked_ce)
        _check(self.ce_chunk_tokens > 0, f"{path}.ce_chunk_tokens", "> 0", self.ce_chunk_tokens)
        _check(not (self.compile and self.strategy.startswith("deepspeed")), f"{path}.compile",
               "false with a DeepSpeed strategy (use ddp or fsdp2 to compile)", self.compile)
        _check(self.pad_vocab_multiple >= 0, f"{path}.pad_vocab_multiple", ">= 0", self.pad_vocab_multiple)
        # A peft adapter checkpoint would then carry the resized embeddings; not supported yet.
        _check(not (self.pad_vocab_multiple and self.finetune == "lora"), f"{path}.pad_vocab_multiple",
               "0 with finetune: lora (vocabulary padding is for full fine-tuning)", self.pad_vocab_multiple)
        _check(self.lr > 0, f"{path}.lr", "> 0", self.lr)
        _check(0 <= self.min_lr_ratio <= 1, f"{path}.min_lr_ratio", "in [0, 1]", self.min_lr_ratio)
        _check(self.warmup_steps >= 0, f"{path}.warmup_steps", ">= 0", self.warmup_steps)
        _check(self.weight_decay >= 0, f"{path}.weight_decay", ">= 0", self.weight_decay)
        _check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), f"{path}.betas",
               "two numbers in [0, 1)", self.betas)
        _check(self.grad_clip >= 0, f"{path}.grad_clip", ">= 0", self.grad_clip)
        _check(self.dtype in ("auto", "float32", "bfloat16"), f"{path}.dtype",
               "'auto', 'float32' or 'bfloat16'", self.dtype)
        _check(self.num_threads >= 0, f"{path}.num_threads", ">= 0", self.num_threads)
        _check(self.rendezvous_timeout_s > 0, f"{path}.rendezvous_timeout_s", "> 0", self.rendezvous_timeout_s)
        _check(self.fail_at_step is None or self.fail_at_step > 0, f"{path}.fail_at_step",
               "null or > 0", self.fail_at_step)
        _check(self.kill_rank_at_step is None or self.kill_rank_at_step > 0, f"{path}.kill_rank_at_step",
               "null or > 0", self.kill_rank_at_step)
        _check(self.keep_last >= 0, f"{path}.keep_last", ">= 0", self.keep_last)
        self.lora.validate(f"{path}.lora")


@dataclass(kw_only=True, slots=True)
class EvaluateConfig:
    evaluators: list[str] = field(default_factory=lambda: ["builtin:catalog"])
    """Task evaluators: ``builtin:catalog`` or a ``package.module:function`` callable."""
    num_task_prompts: int = 200
    """Held-out requests answered by greedy generation for the task metrics."""
    max_new_tokens: int = 48
    """Generation length limit per answer."""
    generation_batch_size: int = 64
    """Prompts per generate() call (left-padded, KV cache)."""
    select_metric: str = "task_score"
    """Metric that picks the best checkpoint (and gates promotion)."""
    select_mode: Literal["max", "min"] = "max"
    """Whether larger (``max``) or smaller (``min``) values of select_metric are better."""
    eval_baseline: bool = True
    """Also score the base model, as the baseline."""

    def validate(self, path: str) -> None:
        for i, spec in enumerate(self.evaluators):
            _check(spec.startswith("builtin:") or ":" in spec, f"{path}.evaluators[{i}]",
                   "'builtin:NAME' or 'module:function'", spec)
        for name in ("num_task_prompts", "max_new_tokens", "generation_batch_size"):
            _check(getattr(self, name) > 0, f"{path}.{name}", "> 0", getattr(self, name))
        _check(bool(self.select_metric), f"{path}.select_metric", "a metric name", self.select_metric)
        _check(self.select_mode in ("max", "min"), f"{path}.select_mode", "'max' or 'min'",
               self.select_mode)


@dataclass(kw_only=True, slots=True)
class RegisterConfig:
    model_name: str = "catalog-assistant"
    """Registry name under which versions are published."""
    registry_root: str | None = None
    """Registry location: a folder or ``s3://bucket/prefix``; default ``<storage>/registry``."""

    def validate(self, path: str) -> None:
        from steps.registry import validate_name

        _check(_passes(validate_name, self.model_name), f"{path}.model_name",
               "a registry name (letters, digits, '.', '_', '-'; no '/' or '..')", self.model_name)
        _check(self.registry_root is None or not self.registry_root.startswith("s3://")
               or len(self.registry_root.removeprefix("s3://").strip("/")) > 0,
               f"{path}.registry_root", "a folder or s3://bucket/prefix", self.registry_root)


def _passes(validator, value: Any) -> bool:
    """Whether ``validator(value)`` accepts ``value`` (it raises ``ValueError`` when not)."""
    try:
        validator(value)
    except ValueError:
        return False
    return True


@dataclass(kw_only=True, slots=True)
class PromoteConfig:
    metric: str = "task_score"
    """Metric compared between the new version and the current champion."""
    mode: Literal["max", "min"] = "max"
    """Whether larger (``max``) or smaller (``min``) values of the metric are better."""
    min_delta: float = 0.0
    """The new version must beat the champion by at least this much to take the alias."""
    alias: str = "champion"
    """The alias that the gate moves."""

    def validate(self, path: str) -> None:
        _check(bool(self.metric), f"{path}.metric", "a metric name", self.metric)
        _check(self.mode in ("max", "min"), f"{path}.mode", "'max' or 'min'", self.mode)
        _check(self.min_delta >= 0, f"{path}.min_delta", ">= 0", self.min_delta)
        from steps.registry import validate_alias

        _check(_passes(validate_alias, self.alias), f"{path}.alias",
               "an alias (letters, digits, '.', '_', '-'; not all digits, not 'latest')", self.alias)


@dataclass(kw_only=True, slots=True)
class RetrainConfig:
    """Settings of flows/retrain_flow.py (the SFT flow ignores them)."""

    drops: str | None = None
    """Folder or ``s3://`` prefix where new data files (JSONL, JSONL.gz, Parquet) arrive."""
    force: bool = False
    """Retrain on every drop even if none is new (otherwise a run without new data fails)."""
    schedule: Literal["hourly", "daily", "weekly"] = "daily"
    """How often the deployed flow runs (``@schedule``; read when it is deployed)."""

    def validate(self, path: str) -> None:
        _check(self.drops is None or bool(self.drops.strip()), f"{path}.drops", "null or a URI", self.drops)
        _check(self.schedule in ("hourly", "daily", "weekly"), f"{path}.schedule",
               "'hourly', 'daily' or 'weekly'", self.schedule)


@dataclass(kw_only=True, slots=True)
class DistillConfig:
    """Settings of flows/distill_flow.py (the other flows ignore them); see ``steps.distill``."""

    teacher: str = "registry:catalog-assistant"
    """The teacher: ``registry:NAME`` (the latest version of NAME in the recipe's registry),
    ``registry:NAME@VERSION_OR_ALIAS`` (``@3``, ``@champion``), a local model folder, a
    ``builtin:`` model or a Hugging Face id. It must share the student's tokenizer."""
    temperature: float = 1.0
    """Softmax temperature T of teacher and student; the KL term is scaled by T^2 so that its
    gradients keep their size as T changes (Hinton et al., 2015)."""
    alpha: float = 0.0
    """Weight of the SFT cross-entropy on the labels: loss = alpha * CE + (1 - alpha) * T^2 * KL.
    0 is pure distillation."""
    teacher_logits: Literal["on_the_fly", "top_k"] = "on_the_fly"
    """``on_the_fly``: the teacher runs next to the student in every train step (full
    distribution). ``top_k``: a pass before training stores the teacher's top_k log-probs of
    every trained token with the token shards; training then needs no teacher in memory."""
    top_k: int = 64
    """Teacher tokens kept per trained token with ``teacher_logits: top_k``."""

    def validate(self, path: str) -> None:
        _check(bool(self.teacher.strip()) and self.teacher.strip() != "registry:", f"{path}.teacher",
               "'registry:NAME[@VERSION]', a model folder or a model id", self.teacher)
        _check(self.temperature > 0, f"{path}.temperature", "> 0", self.temperature)
        _check(0 <= self.alpha <= 1, f"{path}.alpha", "in [0, 1]", self.alpha)
        _check(self.teacher_logits in ("on_the_fly", "top_k"), f"{path}.teacher_logits",
               "'on_the_fly' or 'top_k'", self.teacher_logits)
        _check(self.top_k > 0, f"{path}.top_k", "> 0", self.top_k)


@dataclass(kw_only=True, slots=True)
class DPOConfig:
    """Settings of flows/dpo_flow.py (the other flows ignore them); see ``steps.dpo``."""

    policy: str = "registry:catalog-assistant"
    """The starting policy: ``registry:NAME`` (the latest version of NAME in the recipe's registry,
    or ``model.base`` while NAME has no version yet), ``registry:NAME@VERSION_OR_ALIAS`` (``@3``,
    ``@champion``; must exist), a local model folder, a ``builtin:`` model or a Hugging Face id."""
    reference: str | None = None
    """The reference model of the loss (same forms as ``policy``); null = the starting policy.
    Its log-probs are computed once, in ``tokenize``, and stored with the token shards."""
    loss: Literal["sigmoid", "ipo"] = "sigmoid"
    """``sigmoid``: DPO (Rafailov et al., 2023); ``ipo``: squared loss on length-averaged log-ratios
    (Azar et al., 2023), as TRL computes it."""
    beta: float = 0.1
    """How far the policy may move from the reference (larger = closer); IPO's tau."""
    label_smoothing: float = 0.0
    """Conservative DPO (``sigmoid`` only): the probability that a preference label is flipped."""
    sft_weight: float = 0.0
    """Weight of the chosen response's mean token negative log-likelihood, added to each pair's loss
    (RPO, Pang et al., 2024). DPO alone lowers the likelihood of both answers; this keeps the chosen
    one likely. 0 = plain DPO (as TRL's loss types ``sigmoid`` / ``ipo``)."""
    rejected: Literal["dataset", "on_policy"] = "dataset"
    """Where the training pairs' rejected answers come from. ``dataset``: as ingested.
    ``on_policy``: the starting policy answers every training prompt (greedy, plus
    ``on_policy_samples`` sampled answers), the recipe's evaluators judge each answer alone
    by ``on_policy_metric``, and the first answer that scores lower than the chosen one
    (greedy first) becomes the rejected answer: the pairs then target the policy's own
    mistakes. Pairs whose answers all pass keep the dataset's rejected answer. Held-out pairs
    stay as ingested, so runs stay comparable. See ``steps.dpo.on_policy_rejected``."""
    on_policy_samples: int = 4
    """``rejected: on_policy``: sampled answers per prompt besides the greedy one (0 = greedy only)."""
    on_policy_temperature: float = 1.0
    """``rejected: on_policy``: the sampling temperature (1 = the policy's own distribution)."""
    on_policy_metric: str = "task_score"
    """``rejected: on_policy``: the evaluators' metric that judges one answer (higher is better;
    a mean over requests, such as ``task_score``, is that answer's score when given one request)."""

    def validate(self, path: str) -> None:
        for name in ("policy", "reference"):
            value = getattr(self, name)
            _check(value is None and name == "reference" or bool(value and value.strip())
                   and value.strip() != "registry:", f"{path}.{name}",
                   "'registry:NAME[@VERSION]', a model folder or a model id", value)
        _check(self.loss in ("sigmoid", "ipo"), f"{path}.loss", "'sigmoid' or 'ipo'", self.loss)
        _check(self.beta > 0, f"{path}.beta", "> 0", self.beta)
        _check(0 <= self.label_smoothing < 0.5, f"{path}.label_smoothing", "in [0, 0.5)", self.label_smoothing)
        _check(self.sft_weight >= 0, f"{path}.sft_weight", ">= 0", self.sft_weight)
        _check(self.rejected in ("dataset", "on_policy"), f"{path}.rejected", "'dataset' or 'on_policy'",
               self.rejected)
        _check(self.on_policy_samples >= 0, f"{path}.on_policy_samples", ">= 0", self.on_policy_samples)
        _check(self.on_policy_temperature > 0, f"{path}.on_policy_temperature", "> 0", self.on_policy_temperature)
        _check(bool(self.on_policy_metric), f"{path}.on_policy_metric", "a metric name", self.on_policy_metric)
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        if self.rejected == "dataset" and any(getattr(self, name) != defaults[name] for name in defaults
                                              if name.startswith("on_policy_")):
            warn_ignored(f"{path}.on_policy_*", "they apply to rejected 'on_policy' only")
        if self.loss == "ipo" and self.label_smoothing:
            warn_ignored(f"{path}.label_smoothing", "it applies to loss 'sigmoid' only")


@dataclass(kw_only=True, slots=True)
class Recipe:
    name: str = "sft-tiny"
    """A label for this recipe, recorded in lineage."""
    seed: int = 0
    """Seeds data order, initialisation of new parameters, and dropout."""
    storage: str | None = None
    """Root for data, tokens, checkpoints: a folder (default ``$POSTTRAIN_STORAGE`` or ``./.posttrain``)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tokenize: TokenizeConfig = field(default_factory=TokenizeConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    register: RegisterConfig = field(default_factory=RegisterConfig)
    promote: PromoteConfig = field(default_factory=PromoteConfig)
    retrain: RetrainConfig = field(default_factory=RetrainConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)

    def __post_init__(self) -> None:
        _check(not (self.storage or "").startswith("s3://"), "storage",
               "a local folder every node mounts (run storage on s3:// is not supported yet; the registry and "
               "data sources may be on s3://)", self.storage)
        self.model.validate("model")
        self.data.validate("data")
        self.tokenize.validate("tokenize")
        self.train.validate("train")
        self.evaluate.validate("evaluate")
        self.register.validate("register")
        self.promote.validate("promote")
        self.retrain.validate("retrain")
        self.distill.validate("distill")
        self.dpo.validate("dpo")
        _check(self.dpo.rejected == "dataset" or bool(self.evaluate.evaluators), "evaluate.evaluators",
               "at least one evaluator (dpo.rejected 'on_policy' judges the policy's answers with them)",
               self.evaluate.evaluators)
        t = self.train
        _check(t.micro_batch_tokens % self.tokenize.max_seq_tokens == 0, "train.micro_batch_tokens",
               f"a multiple of tokenize.max_seq_tokens ({self.tokenize.max_seq_tokens})",
               t.micro_batch_tokens)
        _check(t.global_batch_tokens % t.micro_batch_tokens == 0, "train.global_batch_tokens",
               f"a multiple of train.micro_batch_tokens ({t.micro_batch_tokens})", t.global_batch_tokens)

    @property
    def storage_root(self) -> str:
        """The resolved storage root (recipe, then ``$POSTTRAIN_STORAGE``, then ``./.posttrain``)."""
        root = self.storage or os.environ.get("POSTTRAIN_STORAGE") or ".posttrain"
        if root.startswith("s3://"):  # Path() would make it a local folder named "s3:"
            raise RecipeError(f"run storage on s3:// is not supported yet ({root!r}): set `storage` (or "
                              "$POSTTRAIN_STORAGE) to a folder every node mounts; the registry and data sources "
                              "may be on s3://")
        return str(Path(root).expanduser().resolve())

    @property
    def registry_root(self) -> str:
        return self.register.registry_root or str(Path(self.storage_root) / "registry")


def _build(cls: type, data: Any, path: str) -> Any:
    """Build dataclass ``cls`` from ``data``, rejecting unknown keys with their dotted path."""
    if isinstance(data, cls):
        return data
    label = path or "recipe"
    if not isinstance(data, dict):
        _report(f"recipe field '{label}' must be a mapping, got {_short(data)}")
        data = {}
    known = {f.name: f for f in dataclasses.fields(cls)}
    for name in sorted(set(data) - set(known), key=str):
        where = f"'{path}.{name}'" if path else f"'{name}'"
        _report(f"recipe has unknown field {_short(where)[1:-1]} (known: {', '.join(sorted(known))})")
    hints = typing.get_type_hints(cls)
    kwargs = {name: _coerce(hints[name], value, f"{path}.{name}" if path else name)
              for name, value in data.items() if name in known}
    try:
        return cls(**{name: value for name, value in kwargs.items() if value is not _INVALID})
    except TypeError as err:  # a required field is missing (or was invalid)
        _report(f"recipe section '{label}': {err}")
        return _INVALID


def _coerce(hint: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, path)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, path) if len(inner) == 1 else value
    if origin is list:
        if not isinstance(value, list):
            return _invalid(path, "a list", value)
        items = [_coerce(args[0], v, f"{path}[{i}]") for i, v in enumerate(value)]
        return _INVALID if any(item is _INVALID for item in items) else items
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            return _invalid(path, f"a list of {len(args)}", value)
        items = tuple(_coerce(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        return _INVALID if any(item is _INVALID for item in items) else items
    if origin is Literal:
        return value if value in args else _invalid(path, f"one of {list(args)}", value)
    if hint is bool:
        return value if isinstance(value, bool) else _invalid(path, "true or false", value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            return _invalid(path, "an integer", value)
        if abs(value) > _MAX_INT:
            return _invalid(path, f"an integer of at most {_MAX_INT:.0e} in size", value)
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return _invalid(path, "a number", value)
        if isinstance(value, int) and abs(value) > _MAX_INT or not math.isfinite(value):
            return _invalid(path, "a finite number", value)
        return float(value)
    if hint is str:
        return value if isinstance(value, str) else _invalid(path, "a string", value)
    return value


_MAX_INT = 10**15  # no count or size in a recipe comes near it; beyond, a typo or an attack


def _invalid(path: str, requirement: str, value: Any) -> object:
    _report(f"recipe field '{path}' must be {requirement}, got {_short(value)}")
    return _INVALID


def recipe_problems(data: Any) -> list[str]:
    """Every problem of a recipe mapping, one line each with its dotted field path (empty: valid).

    >>> for line in recipe_problems({"trian": {}, "train": {"lr": -1, "max_steps": "x"}}):
    ...     print(line)  # doctest: +ELLIPSIS
    recipe has unknown field 'trian' (known: data, distill, dpo, evaluate, ...)
    recipe field 'train.max_steps' must be an integer, got 'x'
    recipe field 'train.lr' must be > 0, got -1.0
    """
    problems: list[str] = []
    token = _PROBLEMS.set(problems)
    try:
        _build(Recipe, {} if data is None else data, "")
    finally:
        _PROBLEMS.reset(token)
    return list(dict.fromkeys(problems))


def missing_local_sources(data: Any) -> list[str]:
    """The problems of ``data.sources`` entries that name a local path that does not exist, read
    from the raw recipe mapping (so they are reported next to every other problem).

    >>> missing_local_sources({"data": {"sources": [{"uri": "builtin:catalog"}, {"uri": "/no/such.jsonl"}]}})
    ["recipe field 'data.sources[1].uri' names no file or folder: '/no/such.jsonl' (a relative path is read from ...)"]
    """
    section = data.get("data") if isinstance(data, dict) else None
    sources = section.get("sources") if isinstance(section, dict) else None
    if not isinstance(sources, list):
        return []
    return [problem for i, source in enumerate(sources)
            if isinstance(source, dict) and isinstance(source.get("uri"), str) and source["uri"].strip()
            and (problem := SourceConfig(uri=source["uri"]).missing_local_path(f"data.sources[{i}]"))]


def recipe_from_dict(data: dict | None) -> Recipe:
    """Parse a (possibly partial) recipe mapping; missing fields take their defaults.

    Raises:
        RecipeError: with every problem of the recipe, one per line (``RecipeError.problems``).
    """
    problems = recipe_problems(data)
    if problems:
        raise RecipeError(problems)
    return _build(Recipe, data or {}, "")


class _RecipeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` for recipes: YAML 1.2 floats (``1e-3`` is a number, as users write
    it, not the string YAML 1.1 makes of it), duplicate keys refused, and bounded aliases and
    nesting, so that a small hostile file ("billion laughs") cannot expand into a huge value."""

    max_aliases = 64
    max_depth = 32

    def __init__(self, stream):
        super().__init__(stream)
        self._num_aliases = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            self._num_aliases += 1
            if self._num_aliases > self.max_aliases:
                raise RecipeError(f"recipe uses more than {self.max_aliases} YAML aliases (*name); "
                                  f"write the values out (line {self.peek_event().start_mark.line + 1})")
        depth = getattr(self, "_depth", 0)
        if depth >= self.max_depth:
            raise RecipeError(f"recipe nests deeper than {self.max_depth} levels "
                              f"(line {self.peek_event().start_mark.line + 1})")
        self._depth = depth + 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth = depth

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise RecipeError(f"recipe has the key {_short(key)} twice in one mapping (lines "
                                  f"{seen[key] + 1} and {key_node.start_mark.line + 1}); keep one")
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[0-9][0-9_]*[eE][-+]?[0-9]+
                  |\.[0-9_]+(?:[eE][-+][0-9]+)?|\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def parse_recipe_yaml(text: str) -> Any:
    r"""The mapping of a YAML recipe, parsed safely (see :class:`_RecipeLoader`).

    >>> parse_recipe_yaml("train:\n  lr: 1e-3\n")
    {'train': {'lr': 0.001}}
    >>> parse_recipe_yaml("a: 1\na: 2\n")
    Traceback (most recent call last):
    steps.config.RecipeError: recipe has the key 'a' twice in one mapping (lines 1 and 2); keep one
    """
    try:
        return yaml.load(text, Loader=_RecipeLoader)  # noqa: S506  (a SafeLoader subclass)
    except yaml.YAMLError as err:
        raise RecipeError(f"recipe is not valid YAML: {str(err)[:300]}") from None


def load_recipe(path: str | Path) -> Recipe:
    """Load a YAML recipe file."""
    return recipe_from_dict(parse_recipe_yaml(Path(path).read_text(encoding="utf-8")))


def recipe_to_dict(recipe: Recipe) -> dict:
    """The recipe as plain JSON-able data (for lineage, manifests and the train subprocess)."""
    def plain(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    return plain(dataclasses.asdict(recipe))


def warn_ignored(path: str, reason: str) -> None:
    """Warn that a setting has no effect in this context (never silently ignore it)."""
    warnings.warn(f"recipe field '{path}' is ignored: {reason}", stacklevel=2)
