"""GRPO's arithmetic (steps/grpo.py): advantages on hand-computed groups, clipping and importance
weights against their formulas, and parity with TRL GRPOTrainer's loss and gradients."""

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from steps import grpo


def test_group_advantages_on_hand_computed_groups():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5, 3.0, 1.0, 2.0, 2.0])
    std = math.sqrt(((0.5 ** 2) * 4) / 3)  # unbiased, of [1, 0, 0, 1]
    a = 0.5 / (std + 1e-4)
    std3 = math.sqrt((1.0 + 1.0 + 0 + 0) / 3)  # of [3, 1, 2, 2], mean 2
    expected = [a, -a, -a, a, 0, 0, 0, 0, 1 / (std3 + 1e-4), -1 / (std3 + 1e-4), 0, 0]
    assert grpo.group_advantages(rewards, 4, "grpo").tolist() == pytest.approx(expected, abs=1e-6)
    assert grpo.group_advantages(rewards, 4, "dr_grpo").tolist() == pytest.approx(
        [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0, 1, -1, 0, 0])
    # Leave-one-out: the reward minus the mean of the group's other three.
    assert grpo.group_advantages(rewards, 4, "rloo").tolist() == pytest.approx(
        [2 / 3, -2 / 3, -2 / 3, 2 / 3, 0, 0, 0, 0, 3 - 5 / 3, 1 - 7 / 3, 0, 0])
    assert grpo.zero_variance_groups(rewards, 4).tolist() == [False] * 4 + [True] * 4 + [False] * 4
    with pytest.raises(ValueError, match="do not form groups of 5"):
        grpo.group_advantages(rewards, 5)


def test_clipping_and_importance_weights_follow_their_formulas():
    logps = torch.log(torch.tensor([[0.5, 0.9, 0.2], [0.3, 0.3, 0.3]]))
    old = torch.log(torch.tensor([[0.25, 0.9, 0.4], [0.3, 0.6, 0.1]]))
    advantages = torch.tensor([1.0, -2.0])
    loss, info = grpo.token_loss(logps, old, advantages, epsilon_low=0.2, epsilon_high=0.28)
    ratio = torch.tensor([[2.0, 1.0, 0.5], [1.0, 0.5, 3.0]])
    torch.testing.assert_close(info["ratio"], ratio)
    # A > 0: the ratio is capped at 1 + 0.28 from above; A < 0: at 1 - 0.2 from below, never the other way.
    expected = [[-1.28, -1.0, -0.5], [2.0, 2 * 0.8, 2 * 3.0]]
    torch.testing.assert_close(loss, torch.tensor(expected))
    assert info["clipped"].tolist() == [[True, False, False], [False, True, False]]
    # Truncated importance sampling: each token's loss times exp(old - sampling), capped.
    sampling = old - torch.tensor([[0.0, math.log(2.0), math.log(10.0)], [0.0, 0.0, 0.0]])
    weighted, info = grpo.token_loss(logps, old, advantages, epsilon_low=0.2, epsilon_high=0.28,
                                     sampling_logps=sampling, is_cap=5.0)
    torch.testing.assert_close(info["is_weight"], torch.tensor([[1.0, 2.0, 5.0], [1.0, 1.0, 1.0]]))
    torch.testing.assert_close(weighted, torch.tensor([[-1.28, -2.0, -2.5], expected[1]]))
    # k3 KL to the reference: exp(ref - logp) - (ref - logp) - 1, >= 0, 0 where they agree.
    with_kl, info = grpo.token_loss(logps, old, advantages, beta=0.1, ref_logps=logps.detach())
    assert info["kl"].abs().max() < 1e-7
    ref = logps.detach() + 0.5
    _, info = grpo.token_loss(logps, old, advantages, beta=0.1, ref_logps=ref)
    torch.testing.assert_close(info["kl"], torch.full_like(logps, math.exp(0.5) - 0.5 - 1))


def _batch(seed: int = 0):
    """A fixed batch: the builtin model, 2 prompts x 4 completions with padding, rewards, and an
    'old' policy a little off the current one (so ratios clip), and a reference."""
    torch.manual_seed(seed)
    num, prompt_len, completion_len, vocab = 8, 6, 7, 2048
    prompt_ids = torch.randint(10, vocab, (num, prompt_len))
    completion_ids = torch.randint(10, vocab, (num, completion_len))
    completion_mask = torch.ones(num, completion_len, dtype=torch.long)
    for row, length in enumerate([7, 5, 7, 3, 6, 7, 2, 4]):
        completion_mask[row, length:] = 0
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0])
    noise = torch.randn(num, completion_len)
    return prompt_ids, completion_ids, completion_mask, rewards, noise


def _per_token_logps(model, prompt_ids, completion_ids, completion_mask):
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention = torch.cat([torch.ones_like(prompt_ids), completion_mask], dim=1)
    logits = model(input_ids=input_ids, attention_mask=attention).logits[:, prompt_ids.size(1) - 1:-1].float()
    return torch.log_softmax(logits, dim=-1).gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)


def _trl_loss(model, loss_type, beta, inputs, logps, entropies):
    """TRL's GRPOTrainer._compute_loss, run on a stand-in trainer whose log-prob function returns
    ``logps`` (TRL 1.16 computes them through its own fused LM head)."""
    from trl.trainer.grpo_trainer import GRPOTrainer

    identity = SimpleNamespace(num_processes=1, gather=lambda x: x, reduce=lambda x, reduction="sum": x)
    trainer = SimpleNamespace(
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token", beta=beta,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
        loss_type=loss_type, epsilon_low=0.2, epsilon_high=0.28, use_vllm=False, model=model,
        current_gradient_accumulation_steps=1, max_completion_length=inputs["completion_ids"].size(1),
        accelerator=identity, _entropy_bonus_enabled=False, aux_loss_enabled=False,
        _metrics=defaultdict(lambda: defaultdict(list)),
        _get_per_token_logps_and_entropies=lambda *args, **kwargs: (logps, entropies, None))
    return GRPOTrainer._compute_loss(trainer, model, inputs)


@pytest.mark.parametrize("loss_type, aggregation", [("grpo", "sequence"), ("dr_grpo", "dr_grpo"), ("dapo", "token")])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_loss_and_gradients_equal_trl_grpo_trainer(builtin_model_dir, loss_type, aggregation, beta):
    """Same model, completions and rewards: our loss and every parameter's gradient equal TRL's
    ``GRPOTrainer`` loss computation within 1e-5 (TRL's aggregation of the same name)."""
    from steps.models import load_model

    pytest.importorskip("trl")
    model = load_model(builtin_model_dir).train()
    prompt_ids, completion_ids, mask, rewards, noise = _batch()
    estimator = "dr_grpo" if loss_type == "dr_grpo" else "grpo"
    advantages = grpo.group_advantages(rewards, 4, estimator)
    with torch.no_grad():
        current = _per_token_logps(model, prompt_ids, completion_ids, mask)
    old = current + 0.3 * noise  # the policy that sampled, some updates ago: ratios clip both ways
    ref = current - 0.2 * noise.flip(0)

    def ours():
        logps = _per_token_logps(model, prompt_ids, completion_ids, mask)
        per_token, info = grpo.token_loss(logps, old, advantages, epsilon_low=0.2, epsilon_high=0.28, beta=beta,
                                          ref_logps=ref)
        assert info["clipped"][mask.bool()].any()
        return grpo.aggregate(per_token, mask, aggregation, max_completion_tokens=completion_ids.size(1))

    def theirs():
        logps = _per_token_logps(model, prompt_ids, completion_ids, mask)
        inputs = {"prompt_ids": prompt_ids, "prompt_mask": torch.ones_like(prompt_ids),
                  "completion_ids": completion_ids, "completion_mask": mask, "advantages": advantages,
                  "old_per_token_logps": old, "ref_per_token_logps": ref,
                  "num_items_in_batch": mask.sum()}
        return _trl_loss(model, loss_type, beta, inputs, logps, torch.zeros_like(logps))

    results = []
    for loss_fn in (ours, theirs):
        model.zero_grad()
        loss = loss_fn()
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (our_loss, our_grads), (trl_loss, trl_grads) = results
    assert abs(float(our_loss - trl_loss)) < 1e-5, (float(our_loss), float(trl_loss))
    assert our_grads.keys() == trl_grads.keys() and our_grads
    worst = max(float((our_grads[n] - trl_grads[n]).abs().max()) for n in our_grads)
    assert worst < 1e-5, worst
    assert any(float(g.abs().max()) > 1e-4 for g in our_grads.values())  # the gradient is not trivially zero
