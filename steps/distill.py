"""Knowledge distillation: a student learns the teacher's next-token distribution.

The loss is the forward KL divergence KL(teacher || student) at temperature ``T``, on the
trained (assistant) tokens of the SFT token shards only, shifted as in :mod:`steps.losses`
(logits at ``i`` predict token ``i + 1``; a document start is never a target)::

    input_ids     [a  b  c  | d  e ]        labels   [-  b  c  | -  e ]
    trained targets      b  c        e      (positions 0, 1 and 3 of logits[:, :-1])
    kl_sum = T^2 * sum over those positions of
             sum_v p_T(v) * (log p_T(v) - log p_S(v)),   p = softmax(logits / T)

``T^2`` keeps the gradients' size independent of ``T`` (Hinton et al., 2015: the soft-target
gradients scale as 1/T^2), so ``T`` can be tuned without retuning the learning rate. With
``distill.alpha`` the SFT cross-entropy on the labels is mixed in::

    loss = alpha * CE + (1 - alpha) * T^2 * KL          (summed; the trainer divides by the
                                                         step's number of trained tokens)

Teacher logits come either from the teacher itself, run next to the student in every train
step (``distill.teacher_logits: on_the_fly``; loaded once per rank, frozen, eval mode, bf16 on
GPU, held outside the trained module), or from a pass before training that keeps, for every
trained token, the teacher's ``top_k`` token ids and log-probs next to the token shards
(``top_k``). The top-k loss uses the teacher's distribution renormalized over those k tokens
against the student's full distribution; with k = the vocabulary it is the full KL.

Teacher and student must share a tokenizer (:func:`check_same_tokenizer`). The KL is taken over
the vocabulary columns both models have (``min`` of their vocabulary sizes), so a student whose
embedding is padded (``train.pad_vocab_multiple``) compares on its real rows only.

The objective is registered as ``"distill"`` in :data:`steps.objectives.OBJECTIVES`; the train
step runs it with ``launch.run_node(..., objective="distill", objective_inputs={"teacher": path})``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from steps.contracts import METRICS, TEACHER_ROW
from steps.losses import IGNORE_INDEX, num_target_tokens, shifted_targets
from steps.packing import collate_rows

"""The ``checkpoint`` name of the teacher's row among the evaluation targets."""
TOP_K_COLUMNS = ("teacher_ids", "teacher_logprobs")
"""Columns the top-k pass adds to the token shards: per trained target token, k ids and their
teacher log-probs (T = 1), flattened in row order."""


class NoTeacher(LookupError):
    """The recipe's teacher cannot be found (for example: no SFT model registered yet)."""


class TokenizerMismatch(ValueError):
    """Teacher and student tokenize differently; the message names what differs."""


# ---------------------------------------------------------------------------------------------
# The loss
# ---------------------------------------------------------------------------------------------

def _kl_sum(teacher_logprobs: torch.Tensor, student_logprobs: torch.Tensor) -> torch.Tensor:
    """sum p_T * (log p_T - log p_S); a teacher probability of 0 contributes 0 (not NaN)."""
    teacher_probs = teacher_logprobs.exp()
    terms = torch.where(teacher_probs > 0, teacher_probs * (teacher_logprobs - student_logprobs),
                        torch.zeros_like(teacher_probs))
    return terms.sum()


def kd_loss_sum(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * sum_positions KL(softmax(teacher / T) || softmax(student / T))`` in fp32.

    Both are ``[num_positions, vocab]`` logits of the positions that count (already selected).

    >>> student = torch.tensor([[0.0, 0.0]]); teacher = torch.tensor([[0.0, 0.0]])
    >>> float(kd_loss_sum(student, teacher, 2.0))
    0.0
    >>> round(float(kd_loss_sum(torch.tensor([[0.0, 0.0]]), torch.tensor([[10.0, -10.0]]), 1.0)), 4)
    0.6931
    """
    student_logprobs = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher_logprobs = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return _kl_sum(teacher_logprobs, student_logprobs) * temperature**2


def top_k_kd_loss_sum(student_logits: torch.Tensor, teacher_ids: torch.Tensor, teacher_logprobs: torch.Tensor,
                      temperature: float) -> torch.Tensor:
    """:func:`kd_loss_sum` against a teacher known only on its top k tokens per position.

    ``teacher_ids`` and ``teacher_logprobs`` are ``[num_positions, k]`` (log-probs at T = 1).
    The teacher's distribution at temperature T is renormalized over its k tokens
    (``log_softmax(logprobs / T)`` over the k: the ``log Z`` of the full softmax cancels); the
    student's is its full softmax at T, read at those k ids. With k = vocab this equals
    :func:`kd_loss_sum`; with fewer, the student is also pushed off the tokens outside the top k.
    """
    student_logprobs = F.log_softmax(student_logits.float() / temperature, dim=-1).gather(-1, teacher_ids)
    teacher_kept = F.log_softmax(teacher_logprobs.float() / temperature, dim=-1)
    return _kl_sum(teacher_kept, student_logprobs) * temperature**2


def _loss_terms(student_logits: torch.Tensor, targets: torch.Tensor, teacher_logits: torch.Tensor | None,
                teacher_ids: torch.Tensor | None, teacher_logprobs: torch.Tensor | None, temperature: float,
                alpha: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, kl, ce)`` sums over ``[num_positions, vocab]`` logits of trained positions."""
    if teacher_logits is not None:
        kl = kd_loss_sum(student_logits, teacher_logits, temperature)
    else:
        kl = top_k_kd_loss_sum(student_logits, teacher_ids, teacher_logprobs, temperature)
    ce = F.cross_entropy(student_logits.float(), targets, reduction="sum")
    return alpha * ce + (1.0 - alpha) * kl, kl, ce


def _chunk_terms(states, head_weight, targets, teacher_states, teacher_head_weight, teacher_ids, teacher_logprobs,
                 temperature: float, alpha: float, num_columns: int):
    """:func:`_loss_terms` of one chunk, from last hidden states (recomputed in backward)."""
    logits = (states @ head_weight.T)[:, :num_columns]
    teacher_logits = None
    if teacher_states is not None:
        with torch.no_grad():
            teacher_logits = (teacher_states @ teacher_head_weight.T)[:, :num_columns]
    return _loss_terms(logits, targets, teacher_logits, teacher_ids, teacher_logprobs, temperature, alpha)


class DistillLoss(torch.nn.Module):
    """The student, whose forward returns the micro-batch's summed distillation loss and metrics.

    This is the module that DDP / FSDP2 / DeepSpeed wrap. The teacher is held in a plain list,
    so it is not a submodule: it has no place in ``named_parameters`` or ``state_dict``, the
    optimizer and the data-parallel wrappers never see it, and checkpoints hold the student only.

    ``forward`` returns ``{"loss", "kl", "ce"}`` sums over the trained tokens: ``kl`` is the
    KL at temperature T (without the T^2 factor), ``ce`` the student's cross-entropy on the
    labels (logged whatever ``alpha`` is).

    ``chunk_tokens`` (``train.chunked_ce``, on by default on GPU): as in
    :func:`steps.losses.chunked_token_loss_sum`, only the trained positions' last hidden states
    are projected onto the vocabulary, ``chunk_tokens`` at a time, and each chunk's student and
    teacher logits are recomputed in backward, so ``[tokens, vocab]`` logits never exist. This
    reads the LM head's weight directly (no bias, no logit soft-capping), like the SFT loss does.
    """

    def __init__(self, model: torch.nn.Module, teacher: torch.nn.Module | None, *, temperature: float,
                 alpha: float, num_columns: int, chunk_tokens: int | None = None):
        super().__init__()
        self.model = model
        self._teacher = [teacher]
        self.temperature, self.alpha, self.num_columns = temperature, alpha, num_columns
        self.chunk_tokens = chunk_tokens

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, labels: torch.Tensor,
                teacher_ids: torch.Tensor | None = None,
                teacher_logprobs: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        targets = shifted_targets(labels, position_ids)
        trained = targets != IGNORE_INDEX
        if teacher_ids is not None:
            teacher_ids, teacher_logprobs = teacher_ids[:, :-1][trained], teacher_logprobs[:, :-1][trained]
        teacher = self._teacher[0] if teacher_ids is None else None
        if self.chunk_tokens:
            loss, kl, ce = self._chunked(input_ids, position_ids, targets[trained], trained, teacher, teacher_ids,
                                         teacher_logprobs)
        else:
            logits = self.model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits
            teacher_logits = None
            if teacher is not None:
                with torch.no_grad():
                    teacher_logits = teacher(input_ids=input_ids, position_ids=position_ids,
                                             use_cache=False).logits[:, :-1][trained][:, :self.num_columns]
            loss, kl, ce = _loss_terms(logits[:, :-1][trained][:, :self.num_columns], targets[trained],
                                       teacher_logits, teacher_ids, teacher_logprobs, self.temperature, self.alpha)
        return {"loss": loss, "kl": kl.detach() / self.temperature**2, "ce": ce.detach()}

    def _chunked(self, input_ids, position_ids, targets, trained, teacher, teacher_ids, teacher_logprobs):
        from torch.utils.checkpoint import checkpoint

        states = self.model.get_decoder()(input_ids=input_ids, position_ids=position_ids,
                                          use_cache=False).last_hidden_state[:, :-1][trained]
        head_weight = self.model.get_output_embeddings().weight
        teacher_states = teacher_head_weight = None
        if teacher is not None:
            with torch.no_grad():
                teacher_states = teacher.get_decoder()(input_ids=input_ids, position_ids=position_ids,
                                                       use_cache=False).last_hidden_state[:, :-1][trained]
            teacher_head_weight = teacher.get_output_embeddings().weight
        # Start from a zero that is part of the graph: a micro-batch without trained tokens
        # still gets a loss that backward accepts (with zero gradients).
        totals = [states.float().sum() * 0.0] * 3
        for start in range(0, targets.numel(), self.chunk_tokens):
            part = slice(start, start + self.chunk_tokens)
            terms = checkpoint(
                _chunk_terms, states[part], head_weight, targets[part],
                None if teacher_states is None else teacher_states[part], teacher_head_weight,
                None if teacher_ids is None else teacher_ids[part],
                None if teacher_logprobs is None else teacher_logprobs[part],
                self.temperature, self.alpha, self.num_columns, use_reentrant=False)
            totals = [total + term for total, term in zip(totals, terms)]
        return totals


# ---------------------------------------------------------------------------------------------
# The objective (see steps/objectives.py)
# ---------------------------------------------------------------------------------------------

def load_teacher(path: str | Path, recipe, device: torch.device) -> torch.nn.Module:
    """The teacher, frozen and in eval mode on ``device``: bf16 on GPU, fp32 on CPU."""
    from steps.models import load_model

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    teacher = load_model(path, recipe.model.trust_remote_code, recipe.model.attn_implementation, dtype=dtype,
                         device_type=device.type)
    return teacher.to(device).eval().requires_grad_(False)


def _vocab_size(path: str | Path, trust_remote_code: bool) -> int:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    return int(config.get_text_config().vocab_size)


class DistillObjective:
    """Distillation on the SFT token shards; the step's loss is the mean over trained tokens.

    ``inputs``: ``{"teacher": model folder}``. With ``distill.teacher_logits: top_k`` the
    token shards must carry :data:`TOP_K_COLUMNS` (:func:`precompute_teacher_top_k`), and the
    teacher is not loaded (only its config is read, for its vocabulary size).
    """

    def __init__(self, recipe, inputs: dict, device: torch.device):
        if not inputs or "teacher" not in inputs:
            raise ValueError("the distill objective needs objective_inputs={'teacher': <model folder>}")
        self.distill = recipe.distill
        self.top_k = self.distill.teacher_logits == "top_k"
        base = ("input_ids", "labels", "position_ids")
        self.columns = base + TOP_K_COLUMNS if self.top_k else base
        if self.top_k:
            self.teacher = None
            self.teacher_vocab = _vocab_size(inputs["teacher"], recipe.model.trust_remote_code)
        else:
            self.teacher = load_teacher(inputs["teacher"], recipe, device)
            self.teacher_vocab = int(self.teacher.config.get_text_config().vocab_size)

    def collate(self, rows: Sequence[dict], row_tokens: int, pad_id: int) -> dict[str, torch.Tensor]:
        batch = collate_rows(rows, row_tokens, pad_id)
        if self.top_k:
            batch.update(_scatter_top_k(rows, batch))
        return batch

    def count(self, step_batch: dict[str, torch.Tensor]) -> int:
        return num_target_tokens(step_batch["labels"], step_batch["position_ids"])

    def module(self, model: torch.nn.Module, *, real_vocab: int | None,
               chunk_tokens: int | None) -> torch.nn.Module:
        student_vocab = real_vocab or int(model.config.get_text_config().vocab_size)
        return DistillLoss(model, self.teacher, temperature=self.distill.temperature, alpha=self.distill.alpha,
                           num_columns=min(student_vocab, self.teacher_vocab), chunk_tokens=chunk_tokens)


def _scatter_top_k(rows: Sequence[dict], batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``[num_rows, row_tokens, k]`` tensors of the stored top-k ids / log-probs, at the positions
    of the trained targets (``logits[:, :-1]`` positions), zeros elsewhere."""
    trained = shifted_targets(batch["labels"], batch["position_ids"]) != IGNORE_INDEX
    num_rows, row_tokens = batch["input_ids"].shape
    k = next((len(row["teacher_ids"]) // int(trained[i].sum()) for i, row in enumerate(rows)
              if int(trained[i].sum())), 1)
    ids = torch.zeros((num_rows, row_tokens, k), dtype=torch.long)
    logprobs = torch.zeros((num_rows, row_tokens, k), dtype=torch.float32)
    for index, row in enumerate(rows):
        positions = trained[index].nonzero().squeeze(1)
        if len(row["teacher_ids"]) != len(positions) * k:
            raise ValueError(f"row {index}: {len(row['teacher_ids'])} stored teacher ids for {len(positions)} "
                             f"trained tokens and top_k={k}; were the top-k shards made from these token shards?")
        ids[index, positions] = torch.as_tensor(row["teacher_ids"], dtype=torch.long).view(-1, k)
        logprobs[index, positions] = torch.as_tensor(row["teacher_logprobs"], dtype=torch.float32).view(-1, k)
    return {"teacher_ids": ids, "teacher_logprobs": logprobs}


# ---------------------------------------------------------------------------------------------
# Precomputed top-k teacher log-probs
# ---------------------------------------------------------------------------------------------

def teacher_top_k_rows(teacher: torch.nn.Module, rows: Sequence[dict], *, row_tokens: int, pad_id: int, k: int,
                       num_columns: int) -> list[dict]:
    """For each packed row: its trained targets' top-k teacher ids and log-probs (T = 1), flat.

    Each returned dict holds ``teacher_ids`` and ``teacher_logprobs`` lists of length
    ``num_trained_targets * k``, in position order (the order :func:`_scatter_top_k` reads).
    """
    device = next(teacher.parameters()).device
    batch = collate_rows(rows, row_tokens, pad_id)
    trained = shifted_targets(batch["labels"], batch["position_ids"]) != IGNORE_INDEX
    with torch.no_grad():
        logits = teacher(input_ids=batch["input_ids"].to(device), position_ids=batch["position_ids"].to(device),
                         use_cache=False).logits[:, :-1, :num_columns]
        top = F.log_softmax(logits.float(), dim=-1).topk(min(k, num_columns), dim=-1)
    out = []
    for index in range(len(rows)):
        keep = trained[index].to(device)
        out.append({"teacher_ids": top.indices[index][keep].flatten().tolist(),
                    "teacher_logprobs": top.values[index][keep].flatten().tolist()})
    return out


def precompute_teacher_top_k(recipe, teacher_path: str | Path, student_path: str | Path, token_stats: dict,
                             run_root: str, *, batch_rows: int = 8) -> dict:
    """The pass before training for ``distill.teacher_logits: top_k``; otherwise a no-op.

    Reads every train token shard, runs the teacher over its rows and writes
    ``<run_root>/tokens/train-teacher-top-k/part-*.parquet``: the same rows with
    :data:`TOP_K_COLUMNS` added. Returns ``token_stats`` with the train URIs pointing at them
    and a ``teacher_top_k`` entry (k, rows, tokens), so the train step reads them unchanged.
    """
    from steps.models import load_tokenizer
    from steps.storage import subdir

    d = recipe.distill
    if d.teacher_logits != "top_k":
        return token_stats
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    teacher = load_teacher(teacher_path, recipe, device)
    num_columns = min(_vocab_size(student_path, recipe.model.trust_remote_code),
                      int(teacher.config.get_text_config().vocab_size))
    k = min(d.top_k, num_columns)
    pad_id = int(load_tokenizer(student_path, recipe.model.trust_remote_code).pad_token_id)
    out_dir = subdir(run_root, "tokens", "train-teacher-top-k")
    uris, num_rows, num_tokens = [], 0, 0
    for shard_index, uri in enumerate(token_stats["train"]["uris"]):
        table = pq.read_table(uri)
        rows = table.select(["input_ids", "labels", "position_ids"]).to_pylist()
        extra = []
        for start in range(0, len(rows), batch_rows):
            extra += teacher_top_k_rows(teacher, rows[start:start + batch_rows],
                                        row_tokens=recipe.tokenize.max_seq_tokens, pad_id=pad_id, k=k,
                                        num_columns=num_columns)
        table = table.append_column("teacher_ids", pa.array([e["teacher_ids"] for e in extra], pa.list_(pa.int32())))
        table = table.append_column("teacher_logprobs",
                                    pa.array([e["teacher_logprobs"] for e in extra], pa.list_(pa.float32())))
        path = out_dir / f"part-{shard_index:05d}.parquet"
        pq.write_table(table, path)
        uris.append(str(path))
        num_rows += len(rows)
        num_tokens += sum(len(e["teacher_ids"]) for e in extra) // k
    print(f"teacher top-{k}: {num_tokens} trained tokens of {num_rows} rows -> {out_dir}")
    return {**token_stats, "train": {**token_stats["train"], "uris": uris},
            "teacher_top_k": {"k": k, "num_rows": num_rows, "num_trained_tokens": num_tokens,
                              "source_uris": list(token_stats["train"]["uris"])}}


# ---------------------------------------------------------------------------------------------
# Teacher and student: finding the teacher, checking the tokenizers, reporting
# ---------------------------------------------------------------------------------------------

def resolve_teacher(recipe, dest: str | Path) -> tuple[str, dict]:
    """The teacher's local folder and what lineage records about it.

    ``distill.teacher`` is ``registry:NAME[@VERSION_OR_ALIAS]`` (downloaded from the recipe's
    registry into ``dest``, checksums verified; the default version is the latest), or anything
    ``model.base`` accepts (a folder, ``builtin:...``, a Hub id), used as it is.

    Returns ``(path, info)``; ``info`` is ``{"spec", "name", "version", "uri", "run", "metrics"}``
    for a registered teacher and ``{"spec", "path"}`` otherwise.

    Raises:
        NoTeacher: the registry has no such model, version or alias (say, no SFT run yet).
    """
    from steps.models import ModelNotFound, resolve_model_ref

    spec = recipe.distill.teacher
    try:
        path, version = resolve_model_ref(spec, recipe, dest, field="distill.teacher")
    except ModelNotFound as error:
        raise NoTeacher(
            f"{error}. Distillation needs a teacher: register an SFT model "
            f"first (`python flows/sft_flow.py run` registers catalog-assistant), or set distill.teacher "
            f"to another registry:NAME, a model folder or a builtin: model") from None
    return path, {"spec": spec, **version} if version else {"spec": spec, "path": path}


def check_same_tokenizer(teacher_path: str | Path, student_path: str | Path, trust_remote_code: bool = False) -> None:
    """Raise :class:`TokenizerMismatch`, naming what differs, unless both tokenize alike.

    Compared: the vocabulary (token -> id), the special tokens (bos, eos, pad, unk and the
    additional ones). A different chat template only warns: the student's template renders
    the data, so the teacher then sees a format it may not have been trained on.
    """
    from steps.models import load_tokenizer

    teacher = load_tokenizer(teacher_path, trust_remote_code)
    student = load_tokenizer(student_path, trust_remote_code)
    problems = []
    teacher_vocab, student_vocab = teacher.get_vocab(), student.get_vocab()
    if teacher_vocab != student_vocab:
        differing = sorted(t for t in set(teacher_vocab) | set(student_vocab)
                           if teacher_vocab.get(t) != student_vocab.get(t))
        examples = ", ".join(f"{t!r}: teacher {teacher_vocab.get(t)} vs student {student_vocab.get(t)}"
                             for t in differing[:3])
        problems.append(f"vocabulary ({len(teacher_vocab)} vs {len(student_vocab)} tokens, {len(differing)} "
                        f"differ, e.g. {examples})")
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        if getattr(teacher, name) != getattr(student, name):
            problems.append(f"{name} ({getattr(teacher, name)!r} vs {getattr(student, name)!r})")
    teacher_special, student_special = _special_tokens(teacher), _special_tokens(student)
    if teacher_special != student_special:
        only_teacher = sorted(teacher_special - student_special)
        only_student = sorted(student_special - teacher_special)
        problems.append(f"special tokens (only the teacher's: {only_teacher[:5]}, only the student's: "
                        f"{only_student[:5]})")
    if problems:
        raise TokenizerMismatch(f"teacher {str(teacher_path)!r} and student {str(student_path)!r} must share a "
                                f"tokenizer; they differ in: {'; '.join(problems)}")
    if teacher.chat_template != student.chat_template:
        warnings.warn(f"teacher {str(teacher_path)!r} and student {str(student_path)!r} have different chat "
                      "templates; the data is rendered with the student's", stacklevel=2)


def _special_tokens(tokenizer) -> set[str]:
    """The named special tokens and every added token marked special (they are never split)."""
    added = {token.content for token in tokenizer.added_tokens_decoder.values() if token.special}
    return set(tokenizer.all_special_tokens) | added


def eval_targets(recipe, student_path: str | Path, teacher_path: str | Path, checkpoints: list[str]) -> list[dict]:
    """:func:`steps.evaluate.eval_targets` (the student's base model and checkpoints) plus the teacher.

    >>> from steps.config import Recipe
    >>> [t["checkpoint"] for t in eval_targets(Recipe(), "/student", "/teacher", ["/r/checkpoints/step-000010"])]
    ['base', 'step-000010', 'teacher']
    """
    from steps import evaluate

    return evaluate.eval_targets(recipe, student_path, checkpoints) + [
        {"checkpoint": TEACHER_ROW, "path": str(teacher_path)}]


def split_teacher_row(rows: list[dict]) -> tuple[list[dict], dict]:
    """``(student rows, teacher row)`` of the evaluate foreach's metrics rows.

    >>> split_teacher_row([{"checkpoint": "base"}, {"checkpoint": "teacher"}, {"checkpoint": "step-000010"}])
    ([{'checkpoint': 'base'}, {'checkpoint': 'step-000010'}], {'checkpoint': 'teacher'})
    """
    teacher = [row for row in rows if row["checkpoint"] == TEACHER_ROW]
    if len(teacher) != 1:
        raise ValueError(f"expected one teacher row among the metrics, got {len(teacher)}")
    return [row for row in rows if row["checkpoint"] != TEACHER_ROW], teacher[0]




def teacher_comparison(teacher_row: dict, best: dict, teacher: dict) -> dict:
    """The student's registered checkpoint against its teacher, on the same eval set.

    >>> teacher_comparison({"task_score": 0.75, "eval_loss": 0.25}, {"checkpoint": "step-000040", "task_score": 0.5,
    ...                    "eval_loss": 0.5}, {"spec": "registry:catalog-assistant", "version": 3})["task_score"]
    {'teacher': 0.75, 'student': 0.5, 'student_minus_teacher': -0.25}
    """
    out = {"teacher": teacher.get("spec"), "teacher_version": teacher.get("version"),
           "student_checkpoint": best["checkpoint"]}
    for key in METRICS:
        if key in teacher_row and key in best:
            out[key] = {"teacher": teacher_row[key], "student": best[key],
                        "student_minus_teacher": best[key] - teacher_row[key]}
    return out


def comparison_text(comparison: dict) -> str:
    """A small table of :func:`teacher_comparison` for the end of a run."""
    version = f" v{comparison['teacher_version']}" if comparison.get("teacher_version") else ""
    lines = [f"student ({comparison['student_checkpoint']}) vs teacher ({comparison['teacher']}{version})",
             f"{'metric':<26}{'teacher':>10}{'student':>10}"]
    lines += [f"{key:<26}{comparison[key]['teacher']:>10.4f}{comparison[key]['student']:>10.4f}"
              for key in METRICS if key in comparison]
    return "\n".join(lines)
