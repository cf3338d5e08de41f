"""Data preparation speed: our tokenize + mask + pack against TRL SFTTrainer's own preparation.

Both contenders get the same conversations (the builtin catalog chats, every assistant turn
trained), the same tokenizer (the builtin tiny-llama tokenizer, whose ChatML template has
``{% generation %}`` markers), the same row length (256 tokens), and the same number of
processes (1, then 2):

- ``posttrain``: ``steps.chat.tokenize_dataset`` on a Parquet data shard (what the tokenize
  step runs): render, tokenize in batches, label, pack best-fit-decreasing + refill, write
  token shards. With 1 process the Rust tokenizer encodes on a second thread (and its own
  thread pool) while Python renders and labels; with 2, worker processes do both;
- ``trl``: ``SFTTrainer._prepare_dataset`` with ``assistant_only_loss=True, packing=True``
  (``packing_strategy="bfd"``, ``max_length=256``) on a ``datasets`` folder: tokenize with
  ``return_assistant_tokens_mask``, build labels, pack. The trainer is built on a few rows
  first, so model loading is not timed.

Before timing, the labels of both are compared on unpacked conversations (they must be
identical). Each contender runs in its own subprocess, which reports its peak RSS
(``ru_maxrss`` of itself and of any workers it started). Usage::

    python bench/bench_data.py                          # 20k conversations, 1 and 2 processes each
    python bench/bench_data.py --num-conversations 200000 --contenders posttrain:2   # the RSS check
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# TOKENIZERS_PARALLELISM is left to the libraries' default (on): our tokenize step encodes
# batches, which the Rust tokenizer spreads over the cores; TRL encodes one conversation at a time.
PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))

ROW_TOKENS = 256


def _conversations(num_conversations: int, seed: int) -> list[list[dict]]:
    """Builtin catalog chats, normalized, with every assistant turn trained (TRL trains them all)."""
    from steps.builtin import builtin_dataset
    from steps.ingest import normalize_record

    return [[dict(m, train=True) for m in normalize_record(record)]
            for record in builtin_dataset("catalog", num_conversations, seed)]


def prepare(work: Path, num_conversations: int, seed: int, with_trl: bool) -> dict:
    """Write the data once for all contenders: a Parquet data shard and (for TRL) a ``datasets`` folder."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    from steps.builtin import ensure_builtin_model
    from steps.ingest import DATA_SCHEMA

    model_dir = ensure_builtin_model("tiny-llama", work / "models")
    conversations = _conversations(num_conversations, seed)
    shard = work / "data.parquet"
    writer = pq.ParquetWriter(shard, DATA_SCHEMA)
    for start in range(0, len(conversations), 50_000):
        chunk = conversations[start: start + 50_000]
        writer.write_table(pa.Table.from_pylist(
            [{"id": str(start + i), "messages": m, "meta": "{}", "source": "bench"} for i, m in enumerate(chunk)],
            schema=DATA_SCHEMA))
    writer.close()
    if with_trl:
        rows = [{"messages": [{"role": m["role"], "content": m["content"]} for m in messages]}
                for messages in conversations]
        datasets.Dataset.from_list(rows).save_to_disk(str(work / "hf"))
    return {"model_dir": str(model_dir), "shard": str(shard), "hf": str(work / "hf"),
            "num_conversations": len(conversations)}


def _trl_trainer(model_dir: str, work: Path, dataset, num_proc: int | None):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    args = SFTConfig(output_dir=str(work / "trl-out"), assistant_only_loss=True, packing=True,
                     packing_strategy="bfd", max_length=ROW_TOKENS, dataset_num_proc=num_proc, report_to=[],
                     use_cpu=True)
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir), args=args,
                         train_dataset=dataset.select(range(8)), processing_class=tokenizer)
    return trainer, tokenizer, args


def check_masks(info: dict, work: Path, num_checked: int) -> int:
    """Assert that our labels equal TRL's on the first ``num_checked`` conversations, unpacked."""
    import datasets

    from steps.chat import tokenize_conversation

    dataset = datasets.load_from_disk(info["hf"]).select(range(num_checked))
    trainer, tokenizer, args = _trl_trainer(info["model_dir"], work, dataset, None)
    datasets.disable_caching()
    theirs = trainer._prepare_dataset(dataset, tokenizer, args, packing=False, formatting_func=None,
                                      dataset_name="check")
    datasets.enable_caching()
    for index, (messages, row) in enumerate(zip(dataset["messages"], theirs)):
        ours = tokenize_conversation(tokenizer, messages)
        if ours.input_ids != row["input_ids"] or ours.labels != row["labels"]:
            raise AssertionError(f"conversation {index}: labels differ from TRL's")
    return num_checked


def _peak_rss_mb() -> float:
    # ru_maxrss is in KiB on Linux; workers (TRL's num_proc) are counted by their own peak.
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, children) / 1024


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (user + system): the work done, whatever else runs."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def run_contender(name: str, info: dict, work: Path, num_proc: int) -> dict:
    """One contender, in this (fresh) process; returns seconds, rows, tokens and peak RSS."""
    if name == "posttrain":
        from transformers import AutoTokenizer

        from steps.chat import tokenize_dataset

        tokenizer = AutoTokenizer.from_pretrained(info["model_dir"])
        start, cpu_start = time.perf_counter(), _cpu_seconds()
        stats = tokenize_dataset(tokenizer, [info["shard"]], work / "tokens", max_seq_tokens=ROW_TOKENS,
                                 truncation="drop", num_workers=num_proc)
        seconds, cpu_seconds = time.perf_counter() - start, _cpu_seconds() - cpu_start
        num_rows, num_tokens = stats["num_rows"], stats["num_tokens"]
    elif name == "trl":
        import datasets

        # A fresh copy: datasets caches map() results next to the data, and a cache hit is not a run.
        shutil.copytree(info["hf"], work / "hf")
        dataset = datasets.load_from_disk(str(work / "hf"))
        trainer, tokenizer, args = _trl_trainer(info["model_dir"], work, dataset, num_proc if num_proc > 1 else None)
        start, cpu_start = time.perf_counter(), _cpu_seconds()
        packed = trainer._prepare_dataset(dataset, tokenizer, args, packing=True, formatting_func=None,
                                          dataset_name="train")
        seconds, cpu_seconds = time.perf_counter() - start, _cpu_seconds() - cpu_start
        num_rows = len(packed)
        num_tokens = sum(len(ids) for ids in packed["input_ids"])
    else:
        raise ValueError(f"unknown contender {name!r}")
    return {"contender": f"{name} ({num_proc} process{'es' if num_proc > 1 else ''})", "seconds": seconds,
            "cpu_seconds": cpu_seconds,
            "num_rows": num_rows, "num_tokens": num_tokens,
            "packing_efficiency": num_tokens / (num_rows * ROW_TOKENS), "peak_rss_mb": _peak_rss_mb()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-conversations", type=int, default=20_000)
    parser.add_argument("--contenders", default="posttrain:1,posttrain:2,trl:1,trl:2",
                        help="name:processes, comma-separated (ours: tokenize.num_workers; TRL: dataset_num_proc)")
    parser.add_argument("--num-checked", type=int, default=500, help="conversations whose masks are compared")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs of each contender, taken in turn; the table shows each one's fastest")
    parser.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--run", default=None, help=argparse.SUPPRESS)  # internal: one stage or contender
    args = parser.parse_args()
    contenders = args.contenders.split(",")
    with_trl = any(c.startswith("trl") for c in contenders)

    if args.run == "prepare":
        start = time.perf_counter()
        info = prepare(Path(args.work), args.num_conversations, args.seed, with_trl)
        Path(args.work, "info.json").write_text(json.dumps(info))
        print(f"prepared {info['num_conversations']} conversations in {time.perf_counter() - start:.0f} s")
        return
    if args.run == "check":
        info = json.loads(Path(args.work, "info.json").read_text())
        print(f"masks identical to TRL's on {check_masks(info, Path(args.work), args.num_checked)} "
              "unpacked conversations")
        return
    if args.run:
        info = json.loads(Path(args.work, "info.json").read_text())
        work = Path(args.work) / args.run
        name, num_proc = args.run.split(":")
        print(json.dumps(run_contender(name, info, work, int(num_proc))))
        return

    # Every stage runs in a child started by this small process: on Linux a child's ru_maxrss
    # starts from its parent's at fork, so the parent must not hold the data itself.
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-data-"))
    work.mkdir(parents=True, exist_ok=True)
    base = [sys.executable, __file__, "--work", str(work), "--contenders", args.contenders]

    def stage(name: str) -> str:
        return subprocess.run([*base, "--run", name, "--num-conversations", str(args.num_conversations),
                               "--seed", str(args.seed), "--num-checked", str(args.num_checked)],
                              check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]

    print(stage("prepare"), f"({work})")
    info = json.loads(Path(work, "info.json").read_text())
    if with_trl and args.num_checked:
        print(stage("check"))

    # Contenders take turns, so a burst of load from other jobs hits them alike; on a shared
    # machine the fastest of a few runs is the least disturbed one.
    runs: dict[str, list[dict]] = {name: [] for name in contenders}
    for _ in range(args.repeats):
        for name in contenders:
            shutil.rmtree(work / name, ignore_errors=True)
            (work / name).mkdir()
            runs[name].append(json.loads(stage(name)))
    results = []
    for name in contenders:
        fastest = min(runs[name], key=lambda run: run["seconds"])
        results.append(dict(fastest, peak_rss_mb=max(run["peak_rss_mb"] for run in runs[name])))

    print(f"\n{info['num_conversations']} conversations, {ROW_TOKENS}-token rows, {os.cpu_count()} CPUs, "
          f"fastest of {args.repeats} run(s), load average {os.getloadavg()[0]:.1f} at the end")
    print("| contender | seconds | conversations/s | CPU seconds | rows | packing efficiency | peak RSS (MB) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for result in results:
        throughput = info["num_conversations"] / result["seconds"]
        print(f"| {result['contender']} | {result['seconds']:.1f} | {throughput:,.0f} | {result['cpu_seconds']:.1f} "
              f"| {result['num_rows']} | {result['packing_efficiency']:.3f} | {result['peak_rss_mb']:.0f} |")
    for ours in (r for r in results if r["contender"].startswith("posttrain")):
        for theirs in (r for r in results if r["contender"].startswith("trl")):
            print(f"{ours['contender']} vs {theirs['contender']}: {theirs['seconds'] / ours['seconds']:.1f}x "
                  f"the conversations/s, {theirs['cpu_seconds'] / ours['cpu_seconds']:.1f}x less CPU time")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
