"""The trainer's own GPU path, on the builtin tiny model: what runs where CI cannot look.

1. Packed-row isolation per attention kernel on the GPU: the logits of every document in a
   packed row equal those of the document alone (fp32), for ``sdpa``, ``flex_attention``,
   ``eager`` (and ``flash_attention_2`` where flash-attn is installed), and what ``auto`` picks.
2. ``steps.train.main`` on one GPU with the recipe defaults for a GPU (bf16 autocast, chunked CE,
   attention ``auto``) plus vocabulary padding: the loss falls, MFU is logged, and the
   checkpoint is saved at the real vocabulary size.

The token shards and the model are prepared on a CPU machine (the GPU machine may lack
``datasets``/``metaflow``) and carried along::

    python bench/gpu/gpu_trainer_check.py --prepare .gpu_prep       # here, on CPU
    python3 bench/gpu/gpu_trainer_check.py --prepared .gpu_prep     # there, on the GPU
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, above bench/gpu/

RECIPE = {
    "seed": 0,
    "data": {"builtin_num_conversations": 1200, "eval_fraction": 0.05},
    "tokenize": {"max_seq_tokens": 1024},
    "train": {"micro_batch_tokens": 4096, "global_batch_tokens": 8192, "max_steps": 60, "warmup_steps": 5,
              "lr": 2e-3, "save_every_steps": 60, "log_every_steps": 10, "pad_vocab_multiple": 96},
}


def prepare(dest: Path) -> None:
    from steps import chat
    from steps.builtin import ensure_builtin_model
    from steps.config import recipe_from_dict
    from steps.ingest import ingest

    if dest.exists():
        shutil.rmtree(dest)
    recipe = recipe_from_dict({**RECIPE, "storage": str(dest / "store")})
    model_dir = ensure_builtin_model("tiny-llama", dest / "cache")
    shutil.copytree(model_dir, dest / "model")
    manifest = ingest(recipe, str(dest / "run"))
    stats = chat.tokenize_splits(recipe, str(dest / "model"), manifest, str(dest / "run"))
    uris = [str(Path(u).relative_to(dest)) for u in stats["train"]["uris"]]
    (dest / "prepared.json").write_text(json.dumps({"token_uris": uris}))
    shutil.rmtree(dest / "cache")
    shutil.rmtree(dest / "store", ignore_errors=True)
    print(f"prepared {dest}: {len(uris)} token shard(s)")


def packed_isolation(model_dir: Path) -> None:
    from steps.losses import token_loss_sum  # noqa: F401  (import check of the loss module)
    from steps.models import load_model, resolve_attn_implementation
    from steps.packing import collate_rows, pack_rows

    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(10, 2000, (n,), generator=g).tolist() for n in (300, 200, 500, 24)]
    rows = pack_rows([(ids, ids) for ids in docs], capacity=1024)
    batch = {k: v.cuda() for k, v in collate_rows(rows, 1024, 0).items()}
    kernels = ["sdpa", "flex_attention", "eager"]
    import importlib.util
    if importlib.util.find_spec("flash_attn"):
        kernels.append("flash_attention_2")
    print(f"auto attention on cuda -> {resolve_attn_implementation('auto', 'cuda')}")
    for attn in kernels:
        try:
            model = load_model(model_dir, attn_implementation=attn, dtype=torch.float32).cuda().eval()
            with torch.no_grad():
                packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                               use_cache=False).logits
                worst, position = 0.0, {}
                for r, row in enumerate(rows):
                    start = 0
                    for length in _doc_lengths(row["position_ids"]):
                        ids = torch.tensor([row["input_ids"][start:start + length]]).cuda()
                        alone = model(input_ids=ids, use_cache=False).logits[0]
                        worst = max(worst, float((packed[r, start:start + length] - alone).abs().max()))
                        start += length
            print(f"packed isolation [{attn}] fp32 max |packed - alone| = {worst:.2e} "
                  f"{'OK' if worst <= 1e-4 else 'FAIL (> 1e-4)'}")
        except Exception as err:  # report and go on to the next kernel
            print(f"packed isolation [{attn}] error: {type(err).__name__}: {str(err)[:300]}")


def _doc_lengths(position_ids):
    from steps.efficiency import document_lengths

    return document_lengths(position_ids)


def train_on_gpu(prepared: Path) -> None:
    from safetensors.torch import load_file

    from steps import checkpoint, train
    from steps.config import recipe_from_dict, recipe_to_dict
    from steps.models import load_tokenizer

    info = json.loads((prepared / "prepared.json").read_text())
    out = Path("/tmp/gpu_trainer_check")
    shutil.rmtree(out, ignore_errors=True)
    recipe = recipe_from_dict({**RECIPE, "storage": str(out / "store")})
    spec = train.TrainSpec(recipe=recipe_to_dict(recipe), base_model=str(prepared / "model"),
                           token_uris=[str(prepared / u) for u in info["token_uris"]],
                           checkpoint_root=str(out / "checkpoints"), resume_roots=[],
                           pad_id=load_tokenizer(prepared / "model").pad_token_id)
    out.mkdir(parents=True)
    spec.write(out / "spec.json")
    start = time.perf_counter()
    train.main(str(out / "spec.json"))
    final = checkpoint.list_checkpoints(out / "checkpoints")[-1]
    curve = checkpoint.read_state(final)["train_curve"]
    vocab = load_file(str(final / "model.safetensors"))["model.embed_tokens.weight"].shape[0]
    first, last = curve[0], curve[-1]
    mfu_text = "n/a" if last["mfu"] is None else f"{100 * last['mfu']:.2f}%"
    print(f"trainer on GPU: {len(curve)} logged windows in {time.perf_counter() - start:.0f}s, loss "
          f"{first['loss']:.3f} -> {last['loss']:.3f} ({'falls' if last['loss'] < 0.7 * first['loss'] else 'DOES NOT FALL'}), "
          f"last window {last['tokens_per_s']:,.0f} tokens/s, MFU {mfu_text}, saved vocab {vocab} "
          f"({'OK' if vocab == 2048 else 'WRONG'})")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prepare", type=Path, help="prepare model + token shards into this folder (CPU)")
    parser.add_argument("--prepared", type=Path, help="run the GPU checks on a prepared folder")
    args = parser.parse_args()
    if args.prepare:
        prepare(args.prepare.resolve())
        return
    if not torch.cuda.is_available():
        sys.exit("no GPU: this check runs on a GPU machine (prepare with --prepare on CPU)")
    prepared = args.prepared.resolve()
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")
    packed_isolation(prepared / "model")
    train_on_gpu(prepared)


if __name__ == "__main__":
    main()
