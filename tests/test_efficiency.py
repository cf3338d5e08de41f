"""FLOP/MFU accounting against a hand computation, chunked cross-entropy against the plain loss,
and vocabulary padding that never predicts a padded id and saves at the real size."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from steps.efficiency import count_matmul_params, flops_per_token, mfu, pad_vocab, peak_flops, unpad_vocab
from steps.losses import CausalLMLoss, chunked_token_loss_sum, mask_padded_logits, token_loss_sum


def tiny_llama(vocab=100, tie=True, seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=tie, attn_implementation="sdpa")
    return LlamaForCausalLM(config).eval()


def test_flops_per_token_matches_a_hand_computation():
    model = tiny_llama(vocab=100, tie=False)
    d, ffn, layers, heads, head_dim, kv_dim, vocab = 32, 64, 2, 4, 8, 16, 100
    per_layer = d * (d + 2 * kv_dim + d) + 3 * d * ffn + 2 * d  # q,k,v,o + gate/up/down + 2 norms
    n = layers * per_layer + d + vocab * d  # final norm + untied LM head (input table excluded)
    assert count_matmul_params(model) == n
    assert flops_per_token(model.config, n, seq_len=64) == 6 * n + 12 * layers * heads * head_dim * 64
    tied = tiny_llama(vocab=100, tie=True)
    assert count_matmul_params(tied) == n  # the shared table counts once, as the head


def test_mfu_against_the_peak_table():
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989.4e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("NVIDIA H200") == 989.4e12
    assert mfu(1000.0, 1e9, "NVIDIA A100-SXM4-80GB") == pytest.approx(1e12 / 312e12)
    assert mfu(1000.0, 1e9, "cpu") is None


def _batch(vocab, seed=1):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (2, 24), generator=g)
    labels = input_ids.clone()
    labels[:, :5] = -100
    labels[1, 12:15] = -100
    position_ids = torch.cat([torch.arange(10), torch.arange(14)]).repeat(2, 1)
    return input_ids, labels, position_ids


@pytest.mark.parametrize("chunk_tokens", [1, 7, 4096])
def test_chunked_loss_and_gradients_equal_the_plain_loss(chunk_tokens):
    model = tiny_llama()
    input_ids, labels, position_ids = _batch(100)
    plain = CausalLMLoss(model)(input_ids, position_ids, labels)
    plain.backward()
    plain_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    chunked = CausalLMLoss(model, chunk_tokens=chunk_tokens)(input_ids, position_ids, labels)
    chunked.backward()
    assert abs(plain.item() - chunked.item()) <= 1e-5 * abs(plain.item())
    for name, p in model.named_parameters():
        assert torch.allclose(p.grad, plain_grads[name], atol=1e-5, rtol=1e-4), name


def test_chunked_loss_only_sees_trained_tokens():
    hidden = torch.randn(1, 6, 8)
    weight = torch.randn(11, 8)
    labels = torch.tensor([[-100, 3, -100, 4, -100, -100]])
    position_ids = torch.arange(6).unsqueeze(0)
    expected = torch.nn.functional.cross_entropy((hidden[0, [0, 2]] @ weight.T), torch.tensor([3, 4]),
                                                 reduction="sum")
    got = chunked_token_loss_sum(hidden, weight, labels, position_ids, chunk_tokens=1)
    assert torch.allclose(got, expected, atol=1e-6)
    assert torch.allclose(token_loss_sum((hidden @ weight.T), labels, position_ids), expected, atol=1e-6)


def test_padded_vocab_keeps_logits_and_never_predicts_padding(tmp_path):
    model = tiny_llama(vocab=100)
    input_ids, labels, position_ids = _batch(100)
    with torch.no_grad():
        before = model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits
    real = pad_vocab(model, 64)
    assert real == 100 and model.get_input_embeddings().weight.shape[0] == 128
    with torch.no_grad():
        padded = mask_padded_logits(model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits, real)
    assert padded.shape[-1] == 128 and torch.isneginf(padded[..., 100:]).all()
    assert torch.allclose(padded[..., :100], before, atol=1e-6)
    loss_plain = token_loss_sum(before, labels, position_ids)
    assert torch.allclose(CausalLMLoss(model, real_vocab=real)(input_ids, position_ids, labels), loss_plain, rtol=1e-5)
    assert torch.allclose(CausalLMLoss(model, chunk_tokens=5, real_vocab=real)(input_ids, position_ids, labels),
                          loss_plain, rtol=1e-5)
    unpad_vocab(model, real)
    model.save_pretrained(tmp_path)
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path)
    assert reloaded.config.vocab_size == 100 and reloaded.get_input_embeddings().weight.shape[0] == 100


def test_gpu_check_script_runs_its_cpu_smoke_configuration():
    """bench/gpu/gpu_check.sh is run on a lent H100 only now and then; keep it runnable as it is."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    # The script runs $PYTHON (default python3); use this interpreter even without an activated venv.
    result = subprocess.run(["bash", "bench/gpu/gpu_check.sh", "--smoke"], cwd=root, capture_output=True, text=True,
                            timeout=300, env={**os.environ, "PYTHON": sys.executable})
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| True") or line.startswith("| False")]
    assert len(rows) == 2 and all("error" not in row for row in rows), result.stdout
