"""GRPO's arithmetic: group advantages, the clipped policy-gradient loss per token, and its
aggregation. Plain tensors in, tensors out: the RL trainer and the parity tests call these.

A step of RL with verifiable rewards samples ``G`` completions of each prompt, scores each with
the recipe's rewards, and trains on exactly the sampled tokens::

    rewards     [1, 0, 0, 1 | 0, 0, 0, 0]          two prompts, G = 4 completions each
    advantages  grpo:    (r - group mean) / (group std + 1e-4)   -> [0.87, -0.87, -0.87, 0.87 | 0, 0, 0, 0]
                dr_grpo:  r - group mean                          -> [0.5, -0.5, -0.5, 0.5 | 0, 0, 0, 0]
                rloo:     r - mean of the other G - 1             -> [0.67, -0.67, -0.67, 0.67 | 0, 0, 0, 0]

A group whose rewards are all equal teaches nothing (every advantage is 0).

The loss of token ``t`` of completion ``i`` (PPO's clipped ratio, with the asymmetric clip of
DAPO: ``epsilon_low`` below 1, ``epsilon_high`` above)::

    ratio = exp(logp - old_logp)                 old_logp: the policy that sampled (num_iterations > 1)
    loss  = -min(ratio * A_i, clip(ratio, 1 - epsilon_low, 1 + epsilon_high) * A_i)
            + beta * (exp(ref - logp) - (ref - logp) - 1)        k3 estimate of KL(policy || reference)

With a rollout engine that is not the trainer (a stale policy in async mode, another kernel),
the loss of each token is weighted by ``exp(old_logp - sampling_logp)``, truncated at
``is_cap`` (truncated importance sampling). Aggregation: ``sequence`` (GRPO: each completion's
mean, then the mean over completions), ``token`` (DAPO: the mean over every completion token),
``dr_grpo`` (the sum over tokens / (completions x max completion tokens)). Parity with TRL's
``GRPOTrainer`` loss: ``tests/test_grpo.py``.
"""

from __future__ import annotations

from typing import Literal

import torch

ADVANTAGE_ESTIMATORS = ("grpo", "dr_grpo", "rloo")
AGGREGATIONS = ("sequence", "token", "dr_grpo")


def group_advantages(rewards: torch.Tensor, group_size: int,
                     estimator: Literal["grpo", "dr_grpo", "rloo"] = "grpo", eps: float = 1e-4) -> torch.Tensor:
    """Advantages of ``rewards`` (prompt-major: a prompt's ``group_size`` completions are adjacent).

    >>> group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0]), 4, "dr_grpo").tolist()
    [0.5, -0.5, -0.5, 0.5, 0.0, 0.0, 0.0, 0.0]
    >>> [round(a, 4) for a in group_advantages(torch.tensor([3.0, 0.0, 0.0]), 3, "rloo").tolist()]
    [3.0, -1.5, -1.5]
    """
    if estimator not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"advantage estimator must be one of {ADVANTAGE_ESTIMATORS}, got {estimator!r}")
    if group_size < 2 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not form groups of {group_size} (at least 2 each)")
    groups = rewards.view(-1, group_size)
    mean = groups.mean(dim=1, keepdim=True)
    if estimator == "dr_grpo":
        advantages = groups - mean
    elif estimator == "grpo":
        advantages = (groups - mean) / (groups.std(dim=1, keepdim=True) + eps)  # unbiased std, as TRL
    else:
        advantages = groups - (groups.sum(dim=1, keepdim=True) - groups) / (group_size - 1)
    return advantages.reshape(-1)


def zero_variance_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Per completion: whether its group's rewards are all equal (no signal; ``drop_uniform_groups``).

    >>> zero_variance_groups(torch.tensor([1.0, 1.0, 0.0, 1.0]), 2).tolist()
    [True, True, False, False]
    """
    groups = rewards.view(-1, group_size)
    return (groups == groups[:, :1]).all(dim=1).repeat_interleave(group_size)


def token_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, *,
               epsilon_low: float = 0.2, epsilon_high: float = 0.2, beta: float = 0.0,
               ref_logps: torch.Tensor | None = None, sampling_logps: torch.Tensor | None = None,
               is_cap: float | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The per-token loss ``(B, T)`` of the module docstring, and per-token diagnostics.

    ``logps`` are the training policy's log-probs of the sampled tokens (with grad);
    ``old_logps`` the policy's before this batch's first update (``logps.detach()`` on the first
    iteration); ``advantages`` one per completion ``(B,)``; ``sampling_logps`` what the rollout
    engine reported, for the truncated importance weight. Diagnostics: ``ratio``, ``clipped``
    (the clip changed the loss), ``kl`` (when ``beta``), ``is_weight`` (when sampling log-probs).
    """
    advantages = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
    ratio = torch.exp(logps - old_logps)
    clipped_ratio = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    loss = -torch.min(ratio * advantages, clipped_ratio * advantages)
    info = {"ratio": ratio.detach(),
            "clipped": ((ratio < 1 - epsilon_low) & (advantages < 0)) | ((ratio > 1 + epsilon_high) & (advantages > 0))}
    if sampling_logps is not None:
        weight = torch.exp(old_logps - sampling_logps).detach()
        if is_cap is not None:
            weight = torch.clamp(weight, max=is_cap)
        loss = loss * weight
        info["is_weight"] = weight
    if beta:
        if ref_logps is None:
            raise ValueError("beta > 0 needs the reference model's log-probs")
        delta = ref_logps - logps
        kl = torch.exp(delta) - delta - 1
        loss = loss + beta * kl
        info["kl"] = kl.detach()
    return loss, info


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, how: Literal["sequence", "token", "dr_grpo"] = "sequence",
              max_completion_tokens: int | None = None) -> torch.Tensor:
    """The batch's loss from per-token values; ``mask`` is 1 on completion tokens.

    >>> values, mask = torch.tensor([[1.0, 3.0, 9.0], [4.0, 0.0, 0.0]]), torch.tensor([[1, 1, 0], [1, 0, 0]])
    >>> [aggregate(values, mask, how, 3).item() for how in ("sequence", "token", "dr_grpo")]
    [3.0, 2.6666667461395264, 1.3333333730697632]
    """
    mask = mask.to(per_token.dtype)
    if how == "sequence":
        return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if how == "token":
        return (per_token * mask).sum() / mask.sum().clamp(min=1.0)
    if how == "dr_grpo":
        if not max_completion_tokens:
            raise ValueError("dr_grpo aggregation divides by max_completion_tokens; give it")
        return (per_token * mask).sum() / (per_token.size(0) * max_completion_tokens)
    raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {how!r}")


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> float:
    """The mean of ``values`` over the completion tokens (a logged metric)."""
    mask = mask.to(values.dtype)
    return float((values * mask).sum() / mask.sum().clamp(min=1.0))
