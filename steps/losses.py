"""Causal-LM loss on packed rows, shared by training and evaluation.

Logits at position ``i`` predict the token at ``i + 1``. In a packed row the first token of a
document (``position_ids == 0``) must never be predicted from the previous document, so its
target is masked even if its label says otherwise::

    input_ids     [a  b  c  | d  e ]        (two documents)
    position_ids  [0  1  2  | 0  1 ]
    labels        [-  b  c  | d  e ]        (- = -100)
    targets       [b  c  -  | e ]           (logits[:-1] vs labels[1:], d masked: new document)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def shifted_targets(labels: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """Targets for ``logits[:, :-1]``: ``labels[:, 1:]`` with document starts masked."""
    return labels[:, 1:].masked_fill(position_ids[:, 1:] == 0, IGNORE_INDEX)


def num_target_tokens(labels: torch.Tensor, position_ids: torch.Tensor) -> int:
    return int((shifted_targets(labels, position_ids) != IGNORE_INDEX).sum())


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """Sum of cross-entropy over trained target tokens (fp32), to be divided by the step's count."""
    targets = shifted_targets(labels, position_ids)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(),
                           ignore_index=IGNORE_INDEX, reduction="sum")
