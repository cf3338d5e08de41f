"""DPO pair tokenization: the per-pair path it replaced against the shared dataset writer.

Both paths get the DPO default's training pairs (``configs/dpo_tiny.yaml``: 5000 builtin
catalog pairs, seed 1, 20% held out, so ~4000 for training, with the dataset's own rejected
answers; the default run replaces them with the SFT model's answers, which needs a trained
model) and the builtin tiny-llama tokenizer, 512-token rows:

- ``per-pair``: the path before the shared writer (:func:`per_pair_rows`, kept here as the
  reference): ``steps.chat.tokenize_conversation`` on ``prompt + chosen`` and
  ``prompt + rejected`` of one pair after the other (Jinja renders of every prefix, one
  tokenizer call per sequence), then the pairs packed row by row (``pack_row``), in memory;
- ``writer``: ``steps.chat.write_token_dataset(..., steps.dpo.PAIR_TOKENS)``, what the DPO
  tokenize step runs now: batched renders (template skeletons, generation markers), one
  tokenizer call per batch on a second thread (or worker processes), packing, and the token
  shards written to disk.

The reference log-probs (``steps.dpo.add_reference_logps``) are the same work on the same
rows for both and are not timed here (``--reference`` times them once, on the writer's rows).
Before the table, the rows of both paths are compared column by column (they must be
identical), and so are their counts. The paths take turns, ``--repeats`` times; the table shows
each one's fastest run. Usage::

    python bench/bench_dpo_tokenize.py                       # ~4000 training pairs, 3 runs each
    python bench/bench_dpo_tokenize.py --num-workers 1 2 --reference
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))

ROW_COLUMNS = ("input_ids", "labels", "position_ids", "sequence_ids")


def per_pair_rows(tokenizer, data_uris, *, max_seq_tokens: int, max_reject_fraction: float = 0.0):
    """The DPO tokenization before the shared writer: ``(stats, rows)``, one pair at a time.

    Kept as the reference the writer's pair rows are compared with (here and in
    ``tests/test_dpo.py``); the code is the former ``steps.dpo.tokenize_pairs`` and ``pack_pairs``.
    """
    import numpy as np

    from steps.chat import ChatTemplateError, ConversationTooLong, NoTrainedTokens, tokenize_conversation
    from steps.dpo import read_pairs
    from steps.packing import IGNORE_INDEX, pack_documents, pack_row

    pairs = []
    counts = Counter(num_pairs=0, num_dropped_too_long=0, num_no_trained_tokens=0)
    template_rejects: Counter[str] = Counter()
    first_reject = ""
    for record in read_pairs(data_uris):
        counts["num_pairs"] += 1
        try:
            sequences = tuple(tokenize_conversation(tokenizer, record["prompt"] + record[key], max_seq_tokens)
                              for key in ("chosen", "rejected"))
        except ConversationTooLong:
            counts["num_dropped_too_long"] += 1
            continue
        except NoTrainedTokens:
            counts["num_no_trained_tokens"] += 1
            continue
        except ChatTemplateError as error:
            if error.reason not in ChatTemplateError.RECORD_REASONS:
                raise ChatTemplateError(f"pair {record['id']}: {error}", error.reason) from error
            template_rejects[error.reason] += 1
            first_reject = first_reject or f"pair {record['id']}: {error}"
            continue
        if sum(len(s.input_ids) for s in sequences) > max_seq_tokens:
            counts["num_dropped_too_long"] += 1
            continue
        pairs.append(tuple((s.input_ids, s.labels) for s in sequences))
    num_template_rejects = sum(template_rejects.values())
    if num_template_rejects > max_reject_fraction * counts["num_pairs"]:
        raise ChatTemplateError(f"the chat template rejected {num_template_rejects} of {counts['num_pairs']} pairs; "
                                f"the first: {first_reject}", template_rejects.most_common(1)[0][0])
    bins = pack_documents([len(chosen[0]) + len(rejected[0]) for chosen, rejected in pairs], max_seq_tokens)
    rows = []
    for indices in bins:
        row = pack_row([sequence for index in indices for sequence in pairs[index]])
        row["sequence_ids"] = np.concatenate([np.full(len(sequence[0]), 2 * k + side, dtype=np.int32)
                                              for k, index in enumerate(indices)
                                              for side, sequence in enumerate(pairs[index])])
        rows.append(row)
    num_tokens = sum(len(row["input_ids"]) for row in rows)
    stats = {**counts, "num_template_rejects": num_template_rejects,
             "template_reject_reasons": dict(sorted(template_rejects.items())), "num_packed_pairs": len(pairs),
             "num_rows": len(rows), "num_tokens": num_tokens,
             "num_trained_tokens": int(sum((row["labels"] != IGNORE_INDEX).sum() for row in rows)),
             "packing_efficiency": num_tokens / (len(rows) * max_seq_tokens) if rows else 0.0,
             "max_seq_tokens": max_seq_tokens}
    return stats, rows


def writer_rows(tokenizer, data_uris, out_dir: Path, *, max_seq_tokens: int, num_workers: int = 1):
    """The DPO tokenization now: ``(stats, uris)`` of ``steps.chat.write_token_dataset`` with ``PAIR_TOKENS``."""
    from steps.chat import write_token_dataset
    from steps.dpo import PAIR_TOKENS

    stats = write_token_dataset(tokenizer, data_uris, out_dir, PAIR_TOKENS, max_seq_tokens=max_seq_tokens,
                                num_workers=num_workers)
    return stats, stats["uris"]


def read_rows(uris) -> list[dict]:
    import pyarrow.parquet as pq

    return [row for uri in uris for row in pq.read_table(uri).to_pylist()]


def assert_same_rows(old_stats: dict, old_rows: list[dict], new_stats: dict, new_rows: list[dict]) -> None:
    """The writer's rows and counts are the per-pair path's, column by column."""
    assert len(new_rows) == len(old_rows), (len(new_rows), len(old_rows))
    for index, (old, new) in enumerate(zip(old_rows, new_rows)):
        for name in ROW_COLUMNS:
            assert list(new[name]) == [int(value) for value in old[name]], f"row {index}: {name} differs"
    for key, value in old_stats.items():
        assert new_stats[key] == value, f"{key}: {new_stats[key]} (writer) != {value} (per pair)"


def prepare(work: Path) -> tuple[Path, list[str]]:
    """The builtin model and the DPO default's pairs, ingested as the flow's ``ingest`` step does."""
    import yaml

    from steps import dpo, ingest
    from steps.builtin import ensure_builtin_model
    from steps.config import recipe_from_dict

    recipe = recipe_from_dict({**yaml.safe_load((PROJECT_ROOT / "configs" / "dpo_tiny.yaml").read_text()),
                               "storage": str(work / "storage")})
    manifest = ingest.ingest(recipe, str(work / "run"), record_format=dpo.PAIRS)
    return ensure_builtin_model("tiny-llama", work / "models"), manifest["splits"]["train"]["uris"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--num-workers", type=int, nargs="+", default=[1],
                        help="writer runs with these numbers of processes (tokenize.num_workers)")
    parser.add_argument("--max-seq-tokens", type=int, default=512)
    parser.add_argument("--reference", action="store_true", help="also time the reference log-probs once")
    args = parser.parse_args()

    from steps.models import load_tokenizer

    with tempfile.TemporaryDirectory(prefix="bench-dpo-tokenize-") as tmp:
        work = Path(tmp)
        model_dir, uris = prepare(work)
        tokenizer = load_tokenizer(model_dir)
        seconds: dict[str, list[float]] = {"per-pair": []}
        seconds.update({f"writer, {n} process{'es' if n > 1 else ''}": [] for n in args.num_workers})
        results = {}
        for repeat in range(args.repeats):
            start = time.perf_counter()
            results["per-pair"] = per_pair_rows(tokenizer, uris, max_seq_tokens=args.max_seq_tokens)
            seconds["per-pair"].append(time.perf_counter() - start)
            for num_workers, name in zip(args.num_workers, list(seconds)[1:]):
                start = time.perf_counter()
                results[name] = writer_rows(tokenizer, uris, work / "tokens" / str(num_workers),
                                            max_seq_tokens=args.max_seq_tokens, num_workers=num_workers)
                seconds[name].append(time.perf_counter() - start)
        old_stats, old_rows = results["per-pair"]
        for name in list(seconds)[1:]:
            new_stats, new_uris = results[name]
            assert_same_rows(old_stats, old_rows, new_stats, read_rows(new_uris))
        num_pairs = old_stats["num_pairs"]
        print(f"{num_pairs} training pairs of configs/dpo_tiny.yaml, builtin tiny-llama tokenizer, "
              f"{args.max_seq_tokens}-token rows: {old_stats['num_rows']} rows, identical in every path "
              f"({', '.join(ROW_COLUMNS)} and the counts); fastest of {args.repeats} runs; "
              f"load average {os.getloadavg()[0]:.1f} at the end")
        print("| path | seconds | pairs/s | speed-up over per-pair |\n|---|---:|---:|---:|")
        old_best = min(seconds["per-pair"])
        for name, runs in seconds.items():
            best = min(runs)
            print(f"| {name} | {best:.2f} | {num_pairs / best:,.0f} | {old_best / best:.1f}x |")
        if args.reference:
            import numpy as np

            from steps import dpo
            from steps.models import load_model

            rows = [{k: np.asarray(v) for k, v in row.items()}
                    for row in read_rows(results[list(seconds)[1]][1])]
            start = time.perf_counter()
            dpo.add_reference_logps(load_model(model_dir).eval(), rows, row_tokens=args.max_seq_tokens,
                                    pad_id=tokenizer.pad_token_id, batch_rows=max(1, 4096 // args.max_seq_tokens))
            print(f"reference log-probs (not in the table, the same for both paths): "
                  f"{time.perf_counter() - start:.1f} s for {len(rows)} rows on the CPU")


if __name__ == "__main__":
    main()
