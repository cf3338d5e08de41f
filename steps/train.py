"""The torchrun entrypoint, and the launcher that a Metaflow node uses to start it.

A node of the ``train`` step calls :func:`launch`, which runs::

    python -m torch.distributed.run --nnodes N --node_rank I --master_addr A --master_port P \\
        --nproc_per_node G -m steps.train --spec train_spec.json

Every rank then runs :func:`main`: it loads the base model, reads the packed token shards,
and trains with AdamW (warmup + cosine), gradient clipping and a fixed seed.

Batching, with ``R = tokenize.max_seq_tokens`` (a packed row)::

    rows per micro-batch   = micro_batch_tokens / R
    rows per optimizer step = global_batch_tokens / R
    gradient accumulation   = global_batch_tokens / (micro_batch_tokens * world_size)

Step ``s`` takes rows ``[s * rows_per_step, (s + 1) * rows_per_step)`` of the epoch's shuffled
order, and micro-batch ``m`` of the step goes to rank ``m % world_size``. So the same recipe on
1 rank or on 2 ranks sees the same data per optimizer step, and the loss is normalised by the
number of trained tokens of the whole step on every rank (not per micro-batch).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import os
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import torch
import torch.distributed as dist

from steps import checkpoint
from steps.config import Recipe, recipe_from_dict, recipe_to_dict
from steps.losses import num_target_tokens, token_loss_sum
from steps.packing import collate_rows

PROJECT_ROOT = Path(__file__).resolve().parent.parent
COLLECTIVE_TIMEOUT_S = 60


@dataclass(kw_only=True, slots=True)
class TrainSpec:
    """What a train launch needs; written as JSON next to the checkpoints."""

    recipe: dict
    base_model: str
    token_uris: list[str]
    checkpoint_root: str
    resume_roots: list[str]
    pad_id: int

    @classmethod
    def read(cls, path: str | Path) -> TrainSpec:
        return cls(**json.loads(Path(path).read_text()))

    def write(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({k: getattr(self, k) for k in self.__slots__}, indent=1))


class InjectedFailure(RuntimeError):
    """Raised by ``train.fail_at_step`` to test crash recovery."""


# ---------------------------------------------------------------------------------------------
# Launcher (runs in the Metaflow task, one per node)
# ---------------------------------------------------------------------------------------------

def master_port_for(run_key: str) -> int:
    """A rendezvous port that every node of one run derives alike, without talking first."""
    return 20000 + zlib.crc32(run_key.encode()) % 20000


def launch(spec_path: Path, *, num_nodes: int, node_rank: int, nproc_per_node: int,
           master_addr: str, master_port: int, log_path: Path | None = None) -> None:
    """Run torchrun for this node and stream its output; raise if any rank failed."""
    if num_nodes == 1:  # one node: let torchrun pick a free local port
        rendezvous = ["--standalone"]
    else:
        rendezvous = [f"--nnodes={num_nodes}", f"--node_rank={node_rank}", f"--master_addr={master_addr}",
                      f"--master_port={master_port}", "--rdzv_conf=join_timeout=60"]
    cmd = [sys.executable, "-m", "torch.distributed.run", *rendezvous,
           f"--nproc_per_node={nproc_per_node}", "--max_restarts=0",
           "-m", "steps.train", "--spec", str(spec_path)]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH")]))
    env.setdefault("OMP_NUM_THREADS", "1")  # the trainer sets its own thread count per rank
    print(f"[node {node_rank}] launching: {' '.join(cmd)}", flush=True)
    log = open(log_path, "a", encoding="utf-8") if log_path else None
    try:
        proc = subprocess.Popen(cmd, env=env, cwd=str(PROJECT_ROOT), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, bufsize=1)
        for line in proc.stdout:
            print(line, end="", flush=True)
            if log:
                log.write(line)
        returncode = proc.wait()
    finally:
        if log:
            log.close()
    if returncode != 0:
        raise RuntimeError(f"torchrun on node {node_rank} exited with code {returncode}; "
                           "the rank's error is in the log above")


def run_node(recipe: Recipe, base_model: str, token_stats: dict, run_root: str, *, node_index: int,
             num_nodes: int, main_ip: str, run_key: str) -> dict:
    """One Metaflow node of the train step: write the spec, run torchrun, report rank 0's results.

    Checkpoints of a run live in ``<run_root>/checkpoints``; a restarted step (``@retry``)
    finds them there and continues from the latest complete one.
    """
    from steps.models import load_tokenizer

    ckpt_root = Path(run_root) / "checkpoints"
    logs = Path(run_root) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(base_model, recipe.model.trust_remote_code)
    spec = TrainSpec(recipe=recipe_to_dict(recipe), base_model=str(base_model),
                     token_uris=token_stats["train"]["uris"], checkpoint_root=str(ckpt_root),
                     resume_roots=[], pad_id=int(tokenizer.pad_token_id))
    spec_path = logs / f"train_spec-node{node_index}.json"
    spec.write(spec_path)
    launch(spec_path, num_nodes=num_nodes, node_rank=node_index, nproc_per_node=recipe.train.nproc_per_node,
           master_addr=main_ip if num_nodes > 1 else "127.0.0.1",
           master_port=master_port_for(run_key), log_path=logs / f"train-node{node_index}.log")
    ckpts = checkpoint.list_checkpoints(ckpt_root)
    if not ckpts:
        raise RuntimeError(f"training finished but wrote no checkpoint under {ckpt_root}")
    return {"checkpoints": [str(p) for p in ckpts],
            "train_curve": checkpoint.read_state(ckpts[-1])["train_curve"]}


# ---------------------------------------------------------------------------------------------
# The trainer (runs in every rank)
# ---------------------------------------------------------------------------------------------

def lr_at(step: int, recipe: Recipe) -> float:
    """Learning rate multiplier at ``step`` (0-based): linear warmup, then cosine to min_lr_ratio."""
    t = recipe.train
    if step < t.warmup_steps:
        return (step + 1) / t.warmup_steps
    progress = (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return t.min_lr_ratio + (1.0 - t.min_lr_ratio) * cosine


class PackedRows:
    """All packed rows of the token shards, with the per-epoch shuffled order."""

    def __init__(self, uris: list[str], seed: int):
        tables = [pq.read_table(u, columns=["input_ids", "labels", "position_ids"]) for u in uris]
        self.rows = []
        for table in tables:
            cols = table.to_pydict()
            self.rows += [{"input_ids": i, "labels": l, "position_ids": p}
                          for i, l, p in zip(cols["input_ids"], cols["labels"], cols["position_ids"])]
        if not self.rows:
            raise ValueError(f"no packed rows in {uris}")
        self.seed = seed
        self._order_epoch, self._order = -1, None

    def __len__(self) -> int:
        return len(self.rows)

    def order(self, epoch: int) -> list[int]:
        if epoch != self._order_epoch:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._order, self._order_epoch = torch.randperm(len(self.rows), generator=g).tolist(), epoch
        return self._order

    def step_rows(self, step: int, rows_per_step: int) -> list[dict]:
        """The rows of optimizer step ``step`` (0-based), crossing epoch boundaries as needed."""
        start = step * rows_per_step
        out = []
        for position in range(start, start + rows_per_step):
            epoch, index = divmod(position, len(self.rows))
            out.append(self.rows[self.order(epoch)[index]])
        return out


def _log(rank: int, message: str) -> None:
    print(f"[rank {rank}] {message}", flush=True)


def main(spec_path: str) -> None:
    spec = TrainSpec.read(spec_path)
    recipe = recipe_from_dict(spec.recipe)
    t = recipe.train
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    use_cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(t.num_threads or max(1, (os.cpu_count() or 1) // local_world))
    if world > 1:
        dist.init_process_group("nccl" if use_cuda else "gloo",
                                timeout=dt.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    try:
        _train(spec, recipe, rank, world, device)
    except Exception as err:
        _log(rank, f"FAILED: {type(err).__name__}: {err}")
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _train(spec: TrainSpec, recipe: Recipe, rank: int, world: int, device: torch.device) -> None:
    from steps.models import load_model, load_tokenizer

    t = recipe.train
    row_tokens = recipe.tokenize.max_seq_tokens
    rows_per_micro = t.micro_batch_tokens // row_tokens
    rows_per_step = t.global_batch_tokens // row_tokens
    micro_per_step = rows_per_step // rows_per_micro
    if micro_per_step % world:
        raise ValueError(f"train.global_batch_tokens={t.global_batch_tokens} gives {micro_per_step} "
                         f"micro-batches per step, not divisible by world size {world}")
    grad_accum = micro_per_step // world

    torch.manual_seed(recipe.seed)
    bf16 = t.dtype == "bfloat16" or (t.dtype == "auto" and device.type == "cuda")
    model = load_model(spec.base_model, recipe.model.trust_remote_code,
                       recipe.model.attn_implementation).to(device)
    model.config.use_cache = False
    tokenizer = load_tokenizer(spec.base_model, recipe.model.trust_remote_code)
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=t.betas, weight_decay=t.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, recipe))

    ckpt_root = Path(spec.checkpoint_root)
    if rank == 0:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        checkpoint.remove_stale_temporaries(ckpt_root)
    start_step, curve = 0, []
    resume = checkpoint.latest_checkpoint([ckpt_root] + [Path(r) for r in spec.resume_roots])
    if resume is not None:
        state = checkpoint.read_state(resume)
        from safetensors.torch import load_file

        weights = load_file(str(resume / "model.safetensors"), device=str(device))
        missing, unexpected = model.load_state_dict(weights, strict=False)
        tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
        if set(missing) - tied or unexpected:
            raise RuntimeError(f"checkpoint {resume} does not match the model: missing "
                               f"{sorted(set(missing) - tied)}, unexpected {sorted(unexpected)}")
        optimizer.load_state_dict(torch.load(resume / "optimizer.pt", weights_only=True, map_location=device))
        scheduler.load_state_dict(torch.load(resume / "scheduler.pt", weights_only=True))
        checkpoint.load_rng(resume, rank)
        start_step, curve = state["step"], state["train_curve"]
        _log(rank, f"resumed from {resume} at step {start_step}")

    train_model = model
    if world > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    data = PackedRows(spec.token_uris, recipe.seed)
    if rank == 0:
        _log(rank, f"{sum(p.numel() for p in model.parameters()):,} parameters, {len(data)} packed rows, "
                   f"world {world}, {grad_accum} micro-batch(es) of {rows_per_micro} rows per rank per step, "
                   f"{'bf16 autocast' if bf16 else 'fp32'} on {device.type}")

    model.train()
    window_tokens, window_start = 0, time.perf_counter()
    run_start, steps_timed = time.perf_counter(), 0
    for step in range(start_step, t.max_steps):
        step_batch = collate_rows(data.step_rows(step, rows_per_step), row_tokens, spec.pad_id)
        step_trained = max(1, num_target_tokens(step_batch["labels"], step_batch["position_ids"]))
        mine = list(range(micro_per_step))[rank::world]
        loss_sum = torch.zeros((), device=device)
        for i, m in enumerate(mine):
            rows = slice(m * rows_per_micro, (m + 1) * rows_per_micro)
            batch = {k: v[rows].to(device) for k, v in step_batch.items()}
            sync = i == len(mine) - 1
            ctx = train_model.no_sync() if (world > 1 and not sync) else contextlib.nullcontext()
            with ctx, torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                logits = train_model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
                token_loss = token_loss_sum(logits, batch["labels"], batch["position_ids"])
                # DDP averages gradients over ranks; scale by world so the step's gradient is the
                # mean over every trained token of the global batch.
                (token_loss * world / step_trained).backward()
            loss_sum += token_loss.detach()
            window_tokens += int((batch["input_ids"] != spec.pad_id).sum())
        if t.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if world > 1:
            dist.all_reduce(loss_sum)
        loss = loss_sum.item() / step_trained
        lr = optimizer.param_groups[0]["lr"]
        done = step + 1
        steps_timed += 1

        if done % t.log_every_steps == 0 or done == t.max_steps or done == start_step + 1:
            elapsed = time.perf_counter() - window_start
            tokens_per_s = window_tokens * world / max(elapsed, 1e-9)
            eta_s = (time.perf_counter() - run_start) / steps_timed * (t.max_steps - done)
            curve.append({"step": done, "loss": loss, "lr": lr, "tokens_per_s": tokens_per_s})
            if rank == 0:
                _log(rank, f"step {done}/{t.max_steps} loss {loss:.4f} lr {lr:.2e} "
                           f"tokens/s {tokens_per_s:,.0f} ETA {eta_s:,.0f}s")
            window_tokens, window_start = 0, time.perf_counter()

        if t.fail_at_step is not None and done == t.fail_at_step:
            raise InjectedFailure(f"train.fail_at_step={t.fail_at_step}: injected failure after step {done}")
        if done % t.save_every_steps == 0 or done == t.max_steps:
            _save(model, tokenizer, optimizer, scheduler, ckpt_root, done, curve, rank, world)


def _save(model, tokenizer, optimizer, scheduler, root: Path, step: int, curve: list, rank: int,
          world: int) -> None:
    """Rank 0 writes the checkpoint; every rank adds its RNG state; rank 0 publishes it last."""
    tmp = None
    if rank == 0:
        tmp = checkpoint.begin(root, step)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    if world > 1:
        names = [str(tmp) if tmp else None]
        dist.broadcast_object_list(names, src=0)
        tmp = Path(names[0])
    checkpoint.save_rng(tmp, rank)
    if world > 1:
        dist.barrier()
    if rank == 0:
        final = checkpoint.commit(tmp, step, {"step": step, "train_curve": curve, "world_size": world})
        _log(rank, f"saved checkpoint {final}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="posttrain trainer (run me with torchrun)")
    parser.add_argument("--spec", required=True, help="path of the train spec JSON")
    main(parser.parse_args().spec)
