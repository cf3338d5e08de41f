"""Training speed: our trainer against HF Trainer and TRL SFTTrainer, in real tokens per second.

All contenders train the builtin tiny Llama on the same packed rows (our tokenize step's
output: ``max_seq_tokens`` 256, assistant-only labels), with the same batch (``--rows-per-step``
rows per optimizer step, no gradient accumulation), AdamW, linear warmup + cosine schedule,
gradient clipping 1.0, fp32 on CPU, no gradient checkpointing, one process with
``--threads`` torch threads:

- ``posttrain``: ``steps.train.main`` (the torchrun entrypoint, here one rank);
- ``hf-trainer``: ``transformers.Trainer`` with our ``collate_rows`` as its data collator
  (input_ids, labels, position_ids: the same tensors our trainer feeds the model);
- ``trl-sft``: ``trl.SFTTrainer`` on the same rows given as pre-tokenized ``input_ids`` with a
  ``completion_mask`` (so TRL builds the same labels; its collator pads to the longest row).

Tokens/s counts real (non-padding) tokens of the timed steps, divided by their wall time; the
first step (allocator and thread pool warm-up) is not timed. Usage::

    python bench/bench_train.py                       # 30 steps of 8 rows, 2 threads
    python bench/bench_train.py --steps 60 --threads 4
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))

ROW_TOKENS = 256
LR, WARMUP_STEPS = 3e-3, 2


def prepare(work: Path, num_conversations: int):
    """The builtin model and our packed token shards of the builtin catalog chats."""
    from steps import chat
    from steps.builtin import ensure_builtin_model
    from steps.config import recipe_from_dict
    from steps.ingest import ingest

    recipe = recipe_from_dict({"storage": str(work / "store"), "seed": 0,
                               "data": {"builtin_num_conversations": num_conversations, "eval_fraction": 0.05},
                               "tokenize": {"max_seq_tokens": ROW_TOKENS}})
    model_dir = ensure_builtin_model("tiny-llama", work / "model-cache")
    manifest = ingest(recipe, str(work / "run"))
    stats = chat.tokenize_splits(recipe, str(model_dir), manifest, str(work / "run"))
    return model_dir, stats["train"]["uris"]


# Our trainer's contenders: name -> the recipe's train options that differ from the plain path.
POSTTRAIN_VARIANTS = {
    "posttrain": {},
    # Projects only the trained positions onto the vocabulary (one chunk per micro-batch).
    "posttrain-trained-ce": {"chunked_ce": "on"},
    # torch.compile of each decoder layer (inductor's C++ backend on CPU); compilation is in step 1.
    "posttrain-compile": {"compile": True},
}


def bench_posttrain(work: Path, model_dir: Path, uris: list[str], steps: int, rows: int, threads: int,
                    name: str = "posttrain") -> float:
    """Our trainer, with the recipe options of ``POSTTRAIN_VARIANTS[name]``."""
    from steps import checkpoint, train
    from steps.config import recipe_from_dict, recipe_to_dict
    from steps.models import load_tokenizer

    batch_tokens = rows * ROW_TOKENS
    # One log line after step 1 and one at the end: the last curve entry is the rate of steps 2..N.
    recipe = recipe_from_dict({"seed": 0, "tokenize": {"max_seq_tokens": ROW_TOKENS}, "train": {
        "micro_batch_tokens": batch_tokens, "global_batch_tokens": batch_tokens, "max_steps": steps,
        "warmup_steps": WARMUP_STEPS, "lr": LR, "save_every_steps": steps, "log_every_steps": steps,
        "num_threads": threads, "dtype": "float32", "chunked_ce": "off", "ce_chunk_tokens": batch_tokens,
        **POSTTRAIN_VARIANTS[name]}})
    spec = train.TrainSpec(recipe=recipe_to_dict(recipe), base_model=str(model_dir), token_uris=uris,
                           checkpoint_root=str(work / f"{name}-ckpt"), resume_roots=[],
                           pad_id=load_tokenizer(model_dir).pad_token_id)
    spec.write(work / f"{name}-spec.json")
    train.main(str(work / f"{name}-spec.json"))
    return checkpoint.read_state(checkpoint.list_checkpoints(work / f"{name}-ckpt")[-1])["train_curve"][-1]["tokens_per_s"]


class _Timer:
    """Counts the real tokens of the batches the trainer draws, and times steps 2..N."""

    def __init__(self, pad_id: int):
        self.pad_id, self.batches, self.tokens, self.start, self.end = pad_id, 0, 0, None, None

    def count(self, batch):
        self.batches += 1
        if self.batches > 1:  # batch k is drawn just before step k; step 1 is not timed
            self.tokens += int((batch["input_ids"] != self.pad_id).sum())
        return batch

    def callback(self):
        from transformers import TrainerCallback

        timer = self

        class Callback(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step == 1:
                    timer.start = time.perf_counter()

            def on_train_end(self, args, state, control, **kwargs):
                timer.end = time.perf_counter()

        return Callback()

    def tokens_per_s(self) -> float:
        return self.tokens / (self.end - self.start)


def _rows(uris: list[str]) -> list[dict]:
    import pyarrow.parquet as pq

    rows = []
    for uri in uris:
        cols = pq.read_table(uri, columns=["input_ids", "labels", "position_ids"]).to_pydict()
        rows += [dict(zip(cols, values)) for values in zip(*cols.values())]
    return rows


def _common_args(work: Path, name: str, steps: int, rows: int) -> dict:
    return dict(output_dir=str(work / name), per_device_train_batch_size=rows, gradient_accumulation_steps=1,
                max_steps=steps, learning_rate=LR, warmup_steps=WARMUP_STEPS, lr_scheduler_type="cosine",
                optim="adamw_torch", adam_beta2=0.95, weight_decay=0.0, max_grad_norm=1.0, use_cpu=True,
                save_strategy="no", logging_strategy="no", report_to=[], seed=0, dataloader_num_workers=0,
                gradient_checkpointing=False, bf16=False, fp16=False, disable_tqdm=True)


def bench_hf_trainer(work: Path, model_dir: Path, uris: list[str], steps: int, rows: int) -> float:
    import datasets
    from transformers import Trainer, TrainingArguments

    from steps.models import load_model, load_tokenizer
    from steps.packing import collate_rows

    pad_id = load_tokenizer(model_dir).pad_token_id
    timer = _Timer(pad_id)
    trainer = Trainer(model=load_model(model_dir), args=TrainingArguments(**_common_args(work, "hf", steps, rows)),
                      train_dataset=datasets.Dataset.from_list(_rows(uris)),
                      data_collator=lambda batch: timer.count(collate_rows(batch, ROW_TOKENS, pad_id)),
                      callbacks=[timer.callback()])
    trainer.train()
    return timer.tokens_per_s()


def bench_trl(work: Path, model_dir: Path, uris: list[str], steps: int, rows: int) -> float:
    import datasets
    from trl import SFTConfig, SFTTrainer

    from steps.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    timer = _Timer(tokenizer.pad_token_id)
    data = datasets.Dataset.from_list([{"input_ids": r["input_ids"],
                                        "completion_mask": [int(label != -100) for label in r["labels"]]}
                                       for r in _rows(uris)])
    config = SFTConfig(**_common_args(work, "trl", steps, rows), max_length=ROW_TOKENS, packing=False,
                       completion_only_loss=True, padding_free=False)
    trainer = SFTTrainer(model=load_model(model_dir), args=config, train_dataset=data, processing_class=tokenizer,
                         callbacks=[timer.callback()])
    collate = trainer.data_collator
    trainer.data_collator = lambda batch: timer.count(collate(batch))
    trainer.train()
    return timer.tokens_per_s()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per contender (the first is not timed)")
    parser.add_argument("--rows-per-step", type=int, default=8, help="packed rows of 256 tokens per step")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--num-conversations", type=int, default=2000)
    parser.add_argument("--contenders", default=",".join([*POSTTRAIN_VARIANTS, "hf-trainer", "trl-sft"]))
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        work = Path(tmp)
        model_dir, uris = prepare(work, args.num_conversations)
        for name in args.contenders.split(","):
            if name in POSTTRAIN_VARIANTS:
                results[name] = bench_posttrain(work, model_dir, uris, args.steps, args.rows_per_step, args.threads,
                                                name)
            elif name == "hf-trainer":
                results[name] = bench_hf_trainer(work, model_dir, uris, args.steps, args.rows_per_step)
            elif name == "trl-sft":
                results[name] = bench_trl(work, model_dir, uris, args.steps, args.rows_per_step)
            else:
                raise SystemExit(f"unknown contender {name!r}")
    print(f"\n{args.steps} steps x {args.rows_per_step} rows x {ROW_TOKENS} tokens, fp32, CPU, "
          f"{args.threads} threads, torch {torch.__version__}")
    print(f"| {'trainer':<20} | {'tokens/s':>10} | {'vs posttrain':>12} |\n|---|---:|---:|")
    base = results.get("posttrain")
    for name, rate in results.items():
        ratio = f"{rate / base:.2f}x" if base else "-"
        print(f"| {name:<20} | {rate:>10,.0f} | {ratio:>12} |")


if __name__ == "__main__":
    main()
