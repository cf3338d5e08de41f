"""One-GPU efficiency check: a ~0.5B Llama (random init, no download), packed synthetic data,
bf16 + FSDP2, 30 steps; prints tokens/s, MFU and peak memory with chunked CE off and on.

Run through bench/gpu/gpu_check.sh (torchrun, one process). ``--smoke`` runs a tiny config on CPU
so the script itself is testable anywhere.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, above bench/gpu/

from steps.efficiency import count_matmul_params, device_name, document_lengths, mfu, pad_vocab, training_flops  # noqa: E402
from steps.losses import CausalLMLoss  # noqa: E402

# ~0.5B parameters: 20 layers of 1280 (GQA 20 heads / 4 KV heads), a Llama-3-sized vocabulary
# that is NOT a multiple of 64, so the padding path is exercised.
LARGE = dict(hidden_size=1280, intermediate_size=3456, num_hidden_layers=20, num_attention_heads=20,
             num_key_value_heads=4, vocab_size=128_259, max_position_embeddings=8192)
SMOKE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=1_003, max_position_embeddings=512)


def packed_batch(rows: int, row_tokens: int, vocab: int, seed: int, device) -> dict:
    """Rows of documents of random lengths (64..row/2 tokens), position ids restarting per doc."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (rows, row_tokens), generator=g)
    position_ids = torch.empty_like(input_ids)
    for r in range(rows):
        start = 0
        while start < row_tokens:
            length = min(int(torch.randint(64, max(65, row_tokens // 2), (1,), generator=g)), row_tokens - start)
            position_ids[r, start:start + length] = torch.arange(length)
            start += length
    labels = input_ids.clone()
    labels[position_ids < 16] = -100  # a "prompt" per document that is not trained
    return {k: v.to(device) for k, v in dict(input_ids=input_ids, position_ids=position_ids, labels=labels).items()}


def run(config_kwargs: dict, *, chunked: bool, compiled: bool, steps: int, rows: int, row_tokens: int, attn: str,
        device: torch.device, pad_multiple: int, profile: bool = False) -> dict:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**config_kwargs, tie_word_embeddings=True, attn_implementation=attn, use_cache=False)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    real_vocab = pad_vocab(model, pad_multiple)
    n_matmul = count_matmul_params(model)
    wrapped = CausalLMLoss(model, chunk_tokens=8192 if chunked else None, real_vocab=real_vocab)
    bf16 = device.type == "cuda"
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    for layer in model.model.layers:
        if compiled:  # per decoder layer, before sharding (as torchtitan does)
            layer.compile()
        fully_shard(layer, mp_policy=policy)
    fully_shard(wrapped, mp_policy=policy)
    optimizer = torch.optim.AdamW(wrapped.parameters(), lr=1e-4, fused=bf16)
    batch = packed_batch(rows, row_tokens, real_vocab, 0, device)
    num_targets = int((batch["labels"][:, 1:] != -100).sum())
    # Model FLOPs of one step: every packed document at its own length (attention never
    # crosses documents), the LM head at the real vocabulary size.
    n_real = n_matmul - (model.get_input_embeddings().weight.shape[0] - real_vocab) * config.hidden_size
    step_flops = training_flops(config, n_real, [n for row in batch["position_ids"].tolist()
                                                 for n in document_lengths(row)])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timed_tokens, timed_s, losses = 0, 0.0, []
    for step in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        loss = wrapped(**batch) / num_targets
        loss.backward()
        torch.nn.utils.clip_grad_norm_(wrapped.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))  # syncs
        elapsed = time.perf_counter() - start
        if step >= 5:  # warm-up excluded
            timed_tokens += rows * row_tokens
            timed_s += elapsed
    if profile and device.type == "cuda":  # where the time of a step goes, by kernel
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as profiler

        with profiler(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                (wrapped(**batch) / num_targets).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            torch.cuda.synchronize(device)
        if dist.get_rank() == 0:
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=70))
    tokens_per_s = timed_tokens / max(timed_s, 1e-9)
    fpt = step_flops / (rows * row_tokens)
    return {
        "chunked_ce": chunked,
        "compiled": compiled,
        "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
        "tokens_per_s": tokens_per_s,
        "mfu": mfu(tokens_per_s, fpt, device_name(device)),
        "peak_mem_GiB": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan"),
        "loss_first": losses[0],
        "loss_last": losses[-1],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true", help="tiny config on CPU (tests the script)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--row-tokens", type=int, default=4096)
    parser.add_argument("--attn", default=None, help="attention kernel; default: flex_attention on GPU")
    parser.add_argument("--compile", action="store_true", help="also run with torch.compile per decoder layer")
    parser.add_argument("--only-compiled", action="store_true", help="run only the torch.compile variants")
    parser.add_argument("--profile", action="store_true", help="print the top CUDA kernels of the first variant")
    args = parser.parse_args()
    smoke = args.smoke or not torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if not smoke else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    config = SMOKE if smoke else LARGE
    steps, rows, row_tokens = (8, 2, 256) if smoke else (args.steps, args.rows, args.row_tokens)
    # SDPA with a packed (block-diagonal) mask materializes the mask and loses the flash kernel;
    # FlexAttention keeps document isolation with a block-sparse kernel.
    attn = args.attn or ("sdpa" if smoke else "flex_attention")
    results = []
    variants = [(False, False), (True, False)] + ([(True, True), (False, True)] if args.compile else [])
    if args.only_compiled:
        variants = [(False, True), (True, True)]
    for chunked, compiled in variants:
        try:
            results.append(run(config, chunked=chunked, compiled=compiled, steps=steps, rows=rows,
                               row_tokens=row_tokens, attn=attn, device=device, pad_multiple=64,
                               profile=args.profile and (chunked, compiled) == variants[0]))
        except Exception as err:  # report, and still print the other configurations
            results.append({"chunked_ce": chunked, "compiled": compiled, "error": f"{type(err).__name__}: {err}"[:300]})
        if dist.get_rank() == 0:
            print(results[-1], flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if dist.get_rank() == 0:
        print(f"device: {device_name(device)}  attention: {attn}  rows x tokens: {rows} x {row_tokens}  "
              f"steps: {steps} (first 5 untimed)  torch {torch.__version__}")
        print("| chunked CE | torch.compile | params (M) | tokens/s | MFU | peak memory (GiB) | loss first -> last |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for r in results:
            if "error" in r:
                print(f"| {r['chunked_ce']} | {r['compiled']} | error: {r['error']} | | | | |")
                continue
            mfu_text = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
            print(f"| {r['chunked_ce']} | {r['compiled']} | {r['params_M']:.0f} | {r['tokens_per_s']:,.0f} | {mfu_text} | "
                  f"{r['peak_mem_GiB']:.1f} | {r['loss_first']:.3f} -> {r['loss_last']:.3f} |")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
