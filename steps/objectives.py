"""What training minimises: the objective interface the trainer runs, and the SFT objective.

:mod:`steps.train` is one loop for every recipe (no copies of it drift apart). An objective
tells that loop four things:

- ``columns``: which columns of the token shards make a row;
- ``collate(rows, row_tokens, pad_id)``: how rows become ``[num_rows, row_tokens]`` tensors
  (the trainer slices micro-batches along dim 0, so every tensor is row-major);
- ``count(step_batch)``: what the step's summed loss is divided by (trained tokens for SFT,
  pairs for DPO), computed on the whole optimizer step, on every rank alike;
- ``module(model, real_vocab=..., chunk_tokens=...)``: the ``torch.nn.Module`` whose
  ``forward(**micro_batch)`` returns the micro-batch's summed loss, or a dict of sums with a
  ``"loss"`` key and extra metrics (each divided by ``count`` and logged). DDP, FSDP2 and
  DeepSpeed (:mod:`steps.strategies`) wrap this module, so the loss runs inside the wrapped
  forward, where their hooks expect it.

The trainer picks one by the train spec's ``objective`` name through :data:`OBJECTIVES`; a new
recipe adds one line there and one module of its own.
"""

from __future__ import annotations

import importlib
from typing import Protocol, Sequence

import torch

from steps.losses import CausalLMLoss, num_target_tokens
from steps.packing import collate_rows


class Objective(Protocol):
    columns: tuple[str, ...]

    def collate(self, rows: Sequence[dict], row_tokens: int, pad_id: int) -> dict[str, torch.Tensor]: ...

    def count(self, step_batch: dict[str, torch.Tensor]) -> int: ...

    def module(self, model: torch.nn.Module, *, real_vocab: int | None,
               chunk_tokens: int | None) -> torch.nn.Module: ...


class SFTObjective:
    """Next-token cross-entropy on the trained (assistant) tokens of packed rows.

    The step's loss is the mean over every trained target token of the global batch.
    """

    columns = ("input_ids", "labels", "position_ids")

    def __init__(self, recipe=None, inputs: dict | None = None, device: torch.device | None = None):
        pass  # nothing to prepare: the SFT loss needs only the model

    def collate(self, rows: Sequence[dict], row_tokens: int, pad_id: int) -> dict[str, torch.Tensor]:
        return collate_rows(rows, row_tokens, pad_id)

    def count(self, step_batch: dict[str, torch.Tensor]) -> int:
        return num_target_tokens(step_batch["labels"], step_batch["position_ids"])

    def module(self, model: torch.nn.Module, *, real_vocab: int | None,
               chunk_tokens: int | None) -> torch.nn.Module:
        return CausalLMLoss(model, chunk_tokens=chunk_tokens, real_vocab=real_vocab)


# objective name (TrainSpec.objective) -> "module:class"; the class is built as cls(recipe, inputs, device)
OBJECTIVES = {
    "sft": "steps.objectives:SFTObjective",
    "dpo": "steps.dpo:DPOObjective",
    "distill": "steps.distill:DistillObjective",
}


def objective_for(name: str, recipe, inputs: dict, device: torch.device) -> Objective:
    """Build the objective named ``name`` (see :data:`OBJECTIVES`).

    >>> objective_for("sft", None, {}, torch.device("cpu")).columns
    ('input_ids', 'labels', 'position_ids')
    >>> objective_for("ppo", None, {}, torch.device("cpu"))
    Traceback (most recent call last):
    ValueError: unknown training objective 'ppo' (known: distill, dpo, sft)
    """
    if name not in OBJECTIVES:
        raise ValueError(f"unknown training objective {name!r} (known: {', '.join(sorted(OBJECTIVES))})")
    module_name, class_name = OBJECTIVES[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)(recipe, inputs, device)
