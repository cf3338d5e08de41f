"""DPO settings sweep: which pairs and hyperparameters raise a fine-tuned model's task score.

Trains the ``dpo`` objective (``steps.objectives``, the flow's loss) in-process from one starting
policy on pre-tokenized pair sets (``steps.dpo`` token shards with reference log-probs, as the
flow's ``tokenize`` step writes them), then scores greedy answers to fresh catalog requests with
the catalog evaluator, per kind, with the paired difference to the starting policy. Prints one
table row per (pair set, setting). Meant for a GPU (a few seconds a row); it runs on CPU too.

    python bench/research/dpo_sweep.py --policy DIR --pairs NAME=SHARD [NAME=SHARD ...] [--requests 1000]
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, above bench/research/

from steps.builtin import catalog  # noqa: E402
from steps.config import recipe_from_dict  # noqa: E402
from steps.evaluate import answer_scores, generate_greedy, paired_difference  # noqa: E402
from steps.models import load_model, load_tokenizer  # noqa: E402
from steps.objectives import objective_for  # noqa: E402

SETTINGS = {  # name -> dpo section and train lr / steps
    "b0.1 lr1e-4": ({"beta": 0.1, "sft_weight": 1.0}, 1e-4, 150),
    "b0.1 lr5e-4": ({"beta": 0.1, "sft_weight": 1.0}, 5e-4, 150),
    "b0.5 lr5e-4": ({"beta": 0.5, "sft_weight": 1.0}, 5e-4, 150),
    "b0.5 lr5e-4 sft0": ({"beta": 0.5, "sft_weight": 0.0}, 5e-4, 150),
    "b0.5 lr5e-4 sft5": ({"beta": 0.5, "sft_weight": 5.0}, 5e-4, 150),
    "b0.5 lr1e-3 sft5": ({"beta": 0.5, "sft_weight": 5.0}, 1e-3, 150),
    "b2 lr5e-4": ({"beta": 2.0, "sft_weight": 1.0}, 5e-4, 150),
    "b0.5 lr5e-4 300": ({"beta": 0.5, "sft_weight": 1.0}, 5e-4, 300),
    "ipo t0.5 lr5e-4": ({"beta": 0.5, "loss": "ipo", "sft_weight": 1.0}, 5e-4, 150),
    "b0.1 lr5e-5 600": ({"beta": 0.1, "sft_weight": 1.0}, 5e-5, 600),
    "b0.1 lr1e-4 600": ({"beta": 0.1, "sft_weight": 1.0}, 1e-4, 600),
    "b0.1 lr1e-4 sft5 600": ({"beta": 0.1, "sft_weight": 5.0}, 1e-4, 600),
    "b0.05 lr1e-4 300": ({"beta": 0.05, "sft_weight": 1.0}, 1e-4, 300),
    "b0.1 lr2e-4 sft2 300": ({"beta": 0.1, "sft_weight": 2.0}, 2e-4, 300),
    "b0.1 lr2e-4 sft5 300": ({"beta": 0.1, "sft_weight": 5.0}, 2e-4, 300),
    "b0.1 lr3e-4 sft5 300": ({"beta": 0.1, "sft_weight": 5.0}, 3e-4, 300),
    "b0.1 lr5e-4 sft5 300": ({"beta": 0.1, "sft_weight": 5.0}, 5e-4, 300),
    "b0.1 lr3e-4 sft10 300": ({"beta": 0.1, "sft_weight": 10.0}, 3e-4, 300),
    # Controls: beta ~0 leaves only the RPO term, i.e. continued SFT on the chosen answers.
    "ctl sft lr5e-4 300": ({"beta": 0.001, "sft_weight": 1.0}, 5e-4, 300),
    "ctl sft lr2e-3 300": ({"beta": 0.001, "sft_weight": 1.0}, 2e-3, 300),
    "smoke": ({"beta": 0.5, "sft_weight": 1.0}, 5e-4, 3),
}


def read_rows(path: str) -> list[dict]:
    import pyarrow.parquet as pq

    return [{k: torch.tensor(v) for k, v in row.items()} for row in pq.read_table(path).to_pylist()]


def train(policy: str, rows: list[dict], dpo_section: dict, lr: float, steps: int, device: torch.device,
          rows_per_step: int = 8, seed: int = 0):
    recipe = recipe_from_dict({"tokenize": {"max_seq_tokens": 512},
                               "train": {"micro_batch_tokens": 512 * rows_per_step,
                                         "global_batch_tokens": 512 * rows_per_step},
                               "dpo": dpo_section})
    torch.manual_seed(seed)
    model = load_model(policy).to(device).train()
    module = objective_for("dpo", recipe, {}, device).module(model, real_vocab=None, chunk_tokens=None)
    objective = objective_for("dpo", recipe, {}, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, max(0, s - warmup) / max(1, steps - warmup)))))
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(rows), generator=generator).tolist()
    cycle = itertools.cycle(order)
    for _ in range(steps):
        batch = objective.collate([rows[next(cycle)] for _ in range(rows_per_step)], 512, 0)
        batch = {k: v.to(device) for k, v in batch.items()}
        out = module(**batch)
        loss = out["loss"] / objective.count(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
    return model.eval()


def score(model, tokenizer, records: list[dict]) -> tuple[dict, list[float]]:
    answers = generate_greedy(model, tokenizer, [catalog.task_prompt(r) for r in records], max_new_tokens=48,
                              batch_size=256)
    return catalog.evaluate(records, answers), answer_scores([catalog.evaluate], "task_score", records, answers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", required=True)
    parser.add_argument("--pairs", nargs="+", required=True, help="NAME=token shard with ref_logps")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--request-seed", type=int, default=11)
    parser.add_argument("--settings", nargs="*", default=[name for name in SETTINGS if name != "smoke"])
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = load_tokenizer(args.policy)
    records = list(catalog.generate_conversations(args.requests, seed=args.request_seed))
    base_metrics, base_scores = score(load_model(args.policy).to(device).eval(), tokenizer, records)
    header = (f"{'pairs':<10}{'setting':<20}{'task':>7}{'diff':>8}{'ci95':>7}{'+/-':>9}{'rec':>7}{'search':>7}"
              f"{'qa':>7}{'s':>6}")
    print(f"device {device}, {len(records)} fresh requests (seed {args.request_seed})\n{header}")
    print(f"{'start':<10}{'-':<20}{base_metrics['task_score']:>7.3f}{'':>24}{base_metrics['recommend_valid']:>7.3f}"
          f"{base_metrics['search_hit_at_1']:>7.3f}{base_metrics['qa_accuracy']:>7.3f}", flush=True)
    for spec in args.pairs:
        name, path = spec.split("=", 1)
        rows = read_rows(path)
        for setting in args.settings:
            dpo_section, lr, steps = SETTINGS[setting]
            start = time.perf_counter()
            model = train(args.policy, rows, dpo_section, lr, steps, device)
            metrics, scores = score(model, tokenizer, records)
            p = paired_difference(base_scores, scores)
            print(f"{name:<10}{setting:<20}{metrics['task_score']:>7.3f}{p['difference']:>+8.3f}{p['ci95']:>7.3f}"
                  f"{p['better']:>5}/{p['worse']:<3}{metrics['recommend_valid']:>7.3f}{metrics['search_hit_at_1']:>7.3f}"
                  f"{metrics['qa_accuracy']:>7.3f}{time.perf_counter() - start:>6.0f}", flush=True)


if __name__ == "__main__":
    main()
