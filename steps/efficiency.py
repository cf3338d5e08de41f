"""Throughput accounting (FLOPs per token, MFU) and vocabulary padding.

FLOPs per trained token follow the PaLM / torchtitan convention: ``6 * N`` for the dense
matmuls of forward + backward (``N`` = parameters without the input embedding, which is a
lookup, not a matmul), plus ``12 * layers * heads * head_dim * seq_len`` for attention scores
and values (not halved for causality). For the builtin tiny Llama (4 layers, 192 wide, 6 heads
of 32, vocab 2048, tied embeddings) at 256 tokens::

    N = 4 * (attention 192*(192 + 2*64 + 192) + MLP 3*192*512) + final norm 192 + 4 * 2*192 norms
        + LM head 2048*192                                       (tied: counted once, as the head)
    flops/token = 6 * N + 12 * 4 * 6 * 32 * 256

MFU = achieved FLOP/s / the device's peak dense bf16 FLOP/s (:data:`PEAK_BF16_FLOPS`).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

# Dense (no sparsity) bf16 peak FLOP/s per device, from the vendors' data sheets.
PEAK_BF16_FLOPS = {
    "H200": 989.4e12,
    "H100 PCIe": 756.0e12,
    "H100": 989.4e12,  # SXM
    "A100": 312.0e12,
    "L40S": 362.0e12,
    "A10G": 70.0e12,
}


def peak_flops(device_name: str) -> float | None:
    """Peak bf16 FLOP/s for a device name as torch reports it, or None if unknown.

    >>> peak_flops("NVIDIA H100 80GB HBM3")
    989400000000000.0
    >>> peak_flops("NVIDIA H100 PCIe")
    756000000000000.0
    >>> peak_flops("cpu") is None
    True
    """
    for key in sorted(PEAK_BF16_FLOPS, key=len, reverse=True):  # "H100 PCIe" before "H100"
        if all(part in device_name for part in key.split()):
            return PEAK_BF16_FLOPS[key]
    return None


def count_matmul_params(model: torch.nn.Module) -> int:
    """Parameters that take part in matmuls: all, minus the input embedding table.

    With tied embeddings the shared table is one parameter that serves as the LM head, so it
    counts (once); untied, the input table is excluded and the head counted.
    """
    total = sum(p.numel() for p in model.parameters())
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is embed
    return total if tied else total - embed.numel()


def flops_per_token(config, num_matmul_params: int, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward): ``6 N + 12 L H Q T``."""
    layers = config.num_hidden_layers
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return 6.0 * num_matmul_params + 12.0 * layers * heads * head_dim * seq_len


def document_lengths(position_ids: Sequence[int]) -> list[int]:
    """Lengths of the documents of one packed row, read off the position resets.

    >>> document_lengths([0, 1, 2, 0, 1, 0])
    [3, 2, 1]
    """
    positions = np.asarray(position_ids)
    starts = np.flatnonzero(positions == 0).tolist() + [len(positions)]
    return [end - start for start, end in zip(starts[:-1], starts[1:]) if end > start]


def training_flops(config, num_matmul_params: int, doc_lengths: Sequence[int]) -> float:
    """Training FLOPs (forward + backward) of packed documents with document-isolated attention.

    Every token costs ``6 N``; a token of a document of length ``l`` attends to (up to) ``l``
    positions, so the document's attention costs ``12 L H Q l**2`` (:func:`flops_per_token` at
    ``seq_len = l``, per token). Counting each document at its own length, not at the packed
    row's, keeps MFU honest for packed data.

    >>> from types import SimpleNamespace
    >>> cfg = SimpleNamespace(num_hidden_layers=2, num_attention_heads=4, hidden_size=64)
    >>> training_flops(cfg, 1000, [3, 2]) == 3 * flops_per_token(cfg, 1000, 3) + 2 * flops_per_token(cfg, 1000, 2)
    True
    """
    lengths = np.asarray(doc_lengths, dtype=np.float64)
    attention_per_token_per_position = flops_per_token(config, 0, 1)  # 12 L H Q
    return float(6.0 * num_matmul_params * lengths.sum() + attention_per_token_per_position * (lengths ** 2).sum())


def mfu(tokens_per_s: float, flops_per_tok: float, device_name: str, num_devices: int = 1) -> float | None:
    """Model FLOPs utilization, in [0, 1], or None on a device without a known peak (CPU)."""
    peak = peak_flops(device_name)
    return None if peak is None else tokens_per_s * flops_per_tok / (peak * num_devices)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def pad_vocab(model, multiple: int) -> int:
    """Grow the embedding and LM head to a multiple of ``multiple`` rows; return the real size.

    A vocabulary that is not a multiple of 64 can push the LM-head matmul onto a slower
    kernel. The added rows are never predicted: ``losses.mask_padded_logits`` sets their logits
    to -inf, and :func:`unpad_vocab` restores the real size before saving.
    """
    real = model.get_input_embeddings().weight.shape[0]
    padded = -(-real // multiple) * multiple
    if padded != real:
        model.resize_token_embeddings(padded, mean_resizing=False)
        with torch.no_grad():
            model.get_input_embeddings().weight[real:].zero_()
            head = model.get_output_embeddings()
            if head is not None and head.weight is not model.get_input_embeddings().weight:
                head.weight[real:].zero_()
    return real


def unpad_vocab(model, real_vocab: int) -> None:
    """Shrink the embedding and LM head back to ``real_vocab`` rows (before saving)."""
    if model.get_input_embeddings().weight.shape[0] != real_vocab:
        model.resize_token_embeddings(real_vocab, mean_resizing=False)
