"""The torchrun entrypoint: what every rank runs.

A node of the ``train`` step calls ``steps.launch.launch`` (torch-free), which runs::

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

Strategies (``train.strategy``): ``ddp``; ``fsdp2`` (``fully_shard`` per decoder layer and the
root); ``deepspeed_zero2`` / ``deepspeed_zero3`` (a DeepSpeed engine around the same AdamW and
schedule). All of them scale the loss alike, so on the same recipe and seed their losses agree
(within 1e-5 on CPU). ``train.finetune: lora`` wraps the model with peft adapters first. gloo on
CPU, NCCL on GPU; every process group has a 60 s timeout, so a dead peer fails the step.

Checkpoints (see :mod:`steps.checkpoint`) are written every ``save_every_steps`` and at the end;
a started trainer resumes from the latest complete one in its own checkpoint root or in
``resume_roots``. Failure injection for tests: ``train.fail_at_step`` (every rank raises) and
``train.kill_rank_at_step`` (the last rank is SIGKILLed), each once per checkpoint root.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import math
import os
import signal
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch
import torch.distributed as dist

from steps import checkpoint
from steps.config import Recipe, recipe_from_dict
from steps import efficiency
from steps.launch import COLLECTIVE_TIMEOUT_S, TrainSpec
from steps.objectives import Objective, objective_for


class InjectedFailure(RuntimeError):
    """Raised by ``train.fail_at_step`` to test crash recovery."""


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
    """All packed rows of the token shards (the objective's ``columns``), with the per-epoch
    shuffled order."""

    def __init__(self, uris: list[str], seed: int,
                 columns: tuple[str, ...] = ("input_ids", "labels", "position_ids")):
        self.rows = []
        for uri in uris:
            cols = pq.read_table(uri, columns=list(columns)).to_pydict()
            self.rows += [dict(zip(columns, values)) for values in zip(*(cols[c] for c in columns))]
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
    # Under torchrun every line already carries "[rank N]" (see launch); print plain text here.
    print(message, flush=True)


def _build_model(spec: TrainSpec, recipe: Recipe, device: torch.device, resume: Path | None):
    """The model to train, with the resumed checkpoint's weights, on ``device``, not yet wrapped,
    and its real vocabulary size (the model's own rows may be padded past it).

    ``finetune: lora`` wraps the base model with peft adapters (the base weights frozen); the
    adapter's initial values come from the recipe seed, so every rank builds the same model.
    ``train.pad_vocab_multiple`` pads the embedding and LM head after the weights are loaded
    (checkpoints hold the real size); the padded rows start at zero and, never predicted, get
    no gradient, so they stay zero.
    """
    from steps.models import load_model

    t = recipe.train
    model = load_model(spec.base_model, recipe.model.trust_remote_code, recipe.model.attn_implementation,
                       device_type=device.type)
    model.config.use_cache = False
    if t.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if t.finetune == "lora":
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(
            task_type="CAUSAL_LM", r=t.lora.rank, lora_alpha=t.lora.alpha, lora_dropout=t.lora.dropout,
            target_modules=list(t.lora.target_modules)))
    if resume is not None:
        checkpoint.load_weights(model, resume)
    real_vocab = model.get_input_embeddings().weight.shape[0]
    if t.pad_vocab_multiple:
        real_vocab = efficiency.pad_vocab(model, t.pad_vocab_multiple)
    return model.to(device), real_vocab


def _wrap(loss_module, strategy: str, world: int, device: torch.device):
    """The module that runs forward/backward: the objective's loss module itself, DDP around
    it, or FSDP2 in place."""
    if strategy == "fsdp2" and world > 1:
        from torch.distributed.fsdp import fully_shard

        # One FSDP unit per decoder layer, then the root (embeddings, norm, head, and the loss
        # that uses the head): each layer's parameters are gathered just before its forward and
        # freed after it.
        for module in loss_module.modules():
            if type(module).__name__.endswith("DecoderLayer"):
                fully_shard(module)
        fully_shard(loss_module)
        return loss_module
    if world > 1:
        return torch.nn.parallel.DistributedDataParallel(
            loss_module, device_ids=[device.index] if device.type == "cuda" else None)
    return loss_module


def _sync_gradients(train_model, layout: str, world: int, sync: bool):
    """A context in which backward reduces gradients over ranks only when ``sync`` (last micro-batch).

    DeepSpeed decides this itself from its ``gradient_accumulation_steps``.
    """
    if world == 1 or layout == "deepspeed":
        return contextlib.nullcontext()
    if layout == "fsdp2":
        train_model.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()
    return contextlib.nullcontext() if sync else train_model.no_sync()


def _state_layout(strategy: str, world: int) -> str:
    """How training state is held and checkpointed: ``full`` (one copy, DDP or a single rank),
    ``fsdp2`` (sharded parameters, DCP optimizer shards) or ``deepspeed`` (its engine and files).

    >>> _state_layout("fsdp2", 1), _state_layout("fsdp2", 2), _state_layout("deepspeed_zero2", 1)
    ('full', 'fsdp2', 'deepspeed')
    """
    if strategy.startswith("deepspeed"):
        return "deepspeed"
    return "fsdp2" if strategy == "fsdp2" and world > 1 else "full"


def _deepspeed_engine(model, optimizer, scheduler, t, rows_per_micro: int, grad_accum: int, bf16: bool):
    """A DeepSpeed ZeRO engine around the model, with our AdamW and LR schedule.

    The optimizer is torch's AdamW, as for DDP and FSDP2 (DeepSpeed's fused CPU Adam would be
    compiled on first use and gives slightly different numbers).
    """
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    if deepspeed.get_accelerator().device_name() == "cpu":
        # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce op (~1 min of g++) when
        # its comm backend starts; only `inference_all_reduce` (tensor-parallel inference) uses
        # it, never ZeRO training, whose collectives go through torch.distributed (gloo).
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False

    config = {
        "train_micro_batch_size_per_gpu": rows_per_micro,
        "gradient_accumulation_steps": grad_accum,
        "zero_optimization": {"stage": 3 if t.strategy == "deepspeed_zero3" else 2},
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": t.grad_clip,
        "bf16": {"enabled": bf16},
        "steps_per_print": 2**31 - 1,
    }
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config,
                                      dist_init_required=False)
    return engine


def _failure_armed(root: Path, kind: str, step: int | None) -> bool:
    """Whether a failure injection should still fire: once per checkpoint root, so that a retried
    or resumed step gets past it. Read by every rank at start, before any rank can reach ``step``."""
    return step is not None and not (root / f".injected-{kind}-{step}").exists()


def _mark_failure_fired(root: Path, kind: str, step: int) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / f".injected-{kind}-{step}").touch()


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
        _log(rank, f"rank {rank} FAILED: {type(err).__name__}: {err}")
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _train(spec: TrainSpec, recipe: Recipe, rank: int, world: int, device: torch.device) -> None:
    from steps.models import load_tokenizer

    t = recipe.train
    row_tokens = recipe.tokenize.max_seq_tokens
    rows_per_micro = t.micro_batch_tokens // row_tokens
    rows_per_step = t.global_batch_tokens // row_tokens
    micro_per_step = rows_per_step // rows_per_micro
    if micro_per_step % world:
        raise ValueError(f"train.global_batch_tokens={t.global_batch_tokens} gives {micro_per_step} "
                         f"micro-batches per step, not divisible by world size {world}")
    grad_accum = micro_per_step // world
    ckpt_root = Path(spec.checkpoint_root)
    fail_armed = _failure_armed(ckpt_root, "fail", t.fail_at_step)
    kill_armed = _failure_armed(ckpt_root, "kill", t.kill_rank_at_step)

    torch.manual_seed(recipe.seed)
    bf16 = t.dtype == "bfloat16" or (t.dtype == "auto" and device.type == "cuda")
    resume = checkpoint.latest_checkpoint([ckpt_root] + [Path(r) for r in spec.resume_roots])
    if resume is None and t.resume_from:
        stripped = checkpoint.list_checkpoints(Path(t.resume_from))
        raise RuntimeError(
            f"train.resume_from={t.resume_from!r} holds no resumable checkpoint"
            + (f": its {len(stripped)} checkpoint(s) kept only their weights (train.keep_last dropped the "
               f"optimizer state); to start from those weights instead, set model.base to one of them"
               if stripped else " (no complete checkpoint there)"))
    objective = objective_for(spec.objective, recipe, spec.objective_inputs, device)
    model, real_vocab = _build_model(spec, recipe, device, resume)
    chunked = t.chunked_ce == "on" or (t.chunked_ce == "auto" and device.type == "cuda")
    loss_module = objective.module(model, real_vocab=real_vocab, chunk_tokens=t.ce_chunk_tokens if chunked else None)
    tokenizer = load_tokenizer(spec.base_model, recipe.model.trust_remote_code)
    pad_id = spec.pad_id if spec.pad_id is not None else tokenizer.pad_token_id
    if pad_id is None:
        raise ValueError(f"the tokenizer of {spec.base_model} has no pad token (tokenize sets one): re-run tokenize")
    layout = _state_layout(t.strategy, world)
    if t.compile:  # per decoder layer, before sharding: one graph reused by every layer
        for module in model.modules():
            if type(module).__name__.endswith("DecoderLayer"):
                module.compile()
    train_model = _wrap(loss_module, t.strategy, world, device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=t.lr, betas=t.betas, weight_decay=t.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, recipe))
    engine = None
    if layout == "deepspeed":
        # DeepSpeed owns the optimizer step, gradient reduction, clipping and the scheduler.
        engine = train_model = _deepspeed_engine(loss_module, optimizer, scheduler, t, rows_per_micro, grad_accum,
                                                 bf16)
        bf16 = False  # DeepSpeed's bf16 mode casts the model itself; no autocast on top

    if rank == 0:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        checkpoint.remove_stale_temporaries(ckpt_root)
    start_step, curve = 0, []
    if resume is not None:
        state = checkpoint.read_state(resume)
        if engine is not None:
            checkpoint.load_deepspeed(engine, resume)
        else:
            checkpoint.load_optimizer(model, optimizer, resume, sharded=layout == "fsdp2", device=device)
            scheduler.load_state_dict(torch.load(resume / "scheduler.pt", weights_only=True))
        checkpoint.load_rng(resume, rank)
        start_step, curve = state["step"], state["train_curve"]
        _log(rank, f"resumed from {resume} at step {start_step}")

    data = PackedRows(spec.token_uris, recipe.seed, objective.columns)
    throughput = Throughput(model, real_vocab, device, world)
    if rank == 0:
        num_trainable = sum(p.numel() for p in trainable)
        _log(rank, f"{sum(p.numel() for p in model.parameters()):,} parameters ({num_trainable:,} trained, "
                   f"{t.finetune}), {len(data)} packed rows, {t.strategy} on world {world}, {grad_accum} "
                   f"micro-batch(es) of {rows_per_micro} rows per rank per step, "
                   f"{'bf16 autocast' if bf16 else 'fp32'} on {device.type} ({throughput.device_name}), "
                   f"attention {model.config._attn_implementation}, loss {spec.objective}"
                   f"{f' with chunked CE ({t.ce_chunk_tokens} tokens)' if chunked else ''}"
                   f"{f', vocab padded {real_vocab} -> {model.get_input_embeddings().weight.shape[0]}' if t.pad_vocab_multiple else ''}")

    model.train()
    run_start, steps_timed = time.perf_counter(), 0
    for step in range(start_step, t.max_steps):
        rows = data.step_rows(step, rows_per_step)
        step_batch = objective.collate(rows, row_tokens, pad_id)
        step_count = max(1, objective.count(step_batch))
        throughput.add_step(rows, step_batch["input_ids"] != pad_id)
        mine = list(range(micro_per_step))[rank::world]
        sums: dict[str, torch.Tensor] = {}
        for i, m in enumerate(mine):
            micro = slice(m * rows_per_micro, (m + 1) * rows_per_micro)
            batch = {k: v[micro].to(device) for k, v in step_batch.items()}
            with _sync_gradients(train_model, layout, world, i == len(mine) - 1), \
                    torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                out = train_model(**batch)
                out = out if isinstance(out, dict) else {"loss": out}
                # DDP, FSDP2 and ZeRO average gradients over ranks; scale by world so the step's
                # gradient is the mean over the whole global batch (every trained token, or pair).
                scaled = out["loss"] * world / step_count
            if engine is not None:
                engine.backward(scaled, scale_wrt_gas=False)  # our scale already covers accumulation
                engine.step()  # steps the optimizer only at the accumulation boundary
            else:
                scaled.backward()
            for name, value in out.items():
                sums[name] = sums.get(name, 0) + value.detach().float()
        if engine is None:
            if t.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(trainable, t.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        names = sorted(sums)
        totals = torch.stack([torch.as_tensor(sums[n], device=device) for n in names])
        if world > 1:
            dist.all_reduce(totals)
        metrics = {n: v / step_count for n, v in zip(names, totals.tolist())}
        loss = metrics.pop("loss")
        lr = optimizer.param_groups[0]["lr"]
        done = step + 1
        steps_timed += 1

        on_schedule = done % t.log_every_steps == 0 or done == t.max_steps
        if on_schedule or done == start_step + 1:  # also print the first step, as a sign of life
            window = throughput.window()
            eta_s = (time.perf_counter() - run_start) / steps_timed * (t.max_steps - done)
            if on_schedule:  # the curve has the same rows whether or not the run was resumed
                curve.append({"step": done, "loss": loss, "lr": lr, **window, **metrics})
            if rank == 0:
                extra = "".join(f" {n} {v:.4f}" for n, v in metrics.items())
                mfu_text = f" MFU {100 * window['mfu']:.1f}%" if window["mfu"] is not None else ""
                _log(rank, f"step {done}/{t.max_steps} loss {loss:.4f}{extra} lr {lr:.2e} "
                           f"tokens/s {window['tokens_per_s']:,.0f} TFLOP/s/device "
                           f"{window['tflops_per_device']:.3g}{mfu_text} ETA {eta_s:,.0f}s")

        if fail_armed and done == t.fail_at_step:
            if rank == 0:
                _mark_failure_fired(ckpt_root, "fail", done)
            raise InjectedFailure(f"train.fail_at_step={t.fail_at_step}: injected failure after step {done}")
        if kill_armed and done == t.kill_rank_at_step and rank == world - 1:
            _mark_failure_fired(ckpt_root, "kill", done)
            _log(rank, f"train.kill_rank_at_step={done}: rank {rank} kills itself (SIGKILL)")
            os.kill(os.getpid(), signal.SIGKILL)
        if done % t.save_every_steps == 0 or done == t.max_steps:
            _save(model, tokenizer, optimizer, scheduler, ckpt_root, done, curve, rank, world,
                  layout=layout, engine=engine, keep_last=t.keep_last, real_vocab=real_vocab)


class Throughput:
    """Tokens/s, achieved TFLOP/s per device and MFU over a logging window, for the global batch.

    Every rank counts the whole optimizer step (all ranks' rows), so the numbers are global and
    equal on every rank. Tokens are real (non-padding) tokens; FLOPs follow
    :func:`steps.efficiency.training_flops` (each packed document at its own length), with the
    matmul parameters of the model at its real vocabulary size. MFU is ``None`` on devices
    without a known bf16 peak (CPU).
    """

    def __init__(self, model, real_vocab: int, device: torch.device, world: int):
        self.config, self.world = model.config, world
        padded_rows = model.get_input_embeddings().weight.shape[0] - real_vocab
        self.num_matmul_params = efficiency.count_matmul_params(model) - padded_rows * model.config.hidden_size
        self.device_name = efficiency.device_name(device)
        self._tokens, self._flops, self._start = 0, 0.0, time.perf_counter()

    def add_step(self, rows: list[dict], real_tokens: torch.Tensor) -> None:
        self._tokens += int(real_tokens.sum())
        if "position_ids" in rows[0]:
            lengths = [n for row in rows for n in efficiency.document_lengths(row["position_ids"])]
        else:
            lengths = [len(row["input_ids"]) for row in rows]
        self._flops += efficiency.training_flops(self.config, self.num_matmul_params, lengths)

    def window(self) -> dict:
        """The rates since the last call (or since start), and a new window."""
        elapsed = max(time.perf_counter() - self._start, 1e-9)
        tokens_per_s = self._tokens / elapsed
        flops_per_s = self._flops / elapsed / self.world
        peak = efficiency.peak_flops(self.device_name)
        self._tokens, self._flops, self._start = 0, 0.0, time.perf_counter()
        return {"tokens_per_s": tokens_per_s, "tflops_per_device": flops_per_s / 1e12,
                "mfu": None if peak is None else flops_per_s / peak}


def _save(model, tokenizer, optimizer, scheduler, root: Path, step: int, curve: list, rank: int,
          world: int, *, layout: str, engine, keep_last: int, real_vocab: int) -> None:
    """Write one checkpoint: every rank takes part, rank 0 publishes it when all are done.

    Rank 0 writes the weights (full safetensors, gathered from the shards under FSDP2 and
    ZeRO-3), the tokenizer and the scheduler; the optimizer state is one file from rank 0, one
    DCP shard per rank under FSDP2, or DeepSpeed's own per-rank files; every rank adds its RNG
    state.
    """
    tmp = checkpoint.begin(root, step) if rank == 0 else None
    if world > 1:
        names = [str(tmp) if tmp else None]
        dist.broadcast_object_list(names, src=0)
        tmp = Path(names[0])
    checkpoint.save_weights(model, tmp, is_writer=rank == 0, layout=layout, real_vocab=real_vocab)
    if engine is not None:
        checkpoint.save_deepspeed(engine, tmp)
    else:
        checkpoint.save_optimizer(model, optimizer, tmp, is_writer=rank == 0, sharded=layout == "fsdp2")
    if rank == 0:
        tokenizer.save_pretrained(tmp)
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    checkpoint.save_rng(tmp, rank)
    if world > 1:
        dist.barrier()
    if rank == 0:
        final = checkpoint.commit(tmp, step, {"step": step, "train_curve": curve, "world_size": world})
        _log(rank, f"saved checkpoint {final}")
        for pruned in checkpoint.prune(root, keep_last, keep_weights=True):
            _log(rank, f"dropped the resume state of {pruned} (train.keep_last={keep_last}); its weights stay "
                       f"for evaluation")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="posttrain trainer (run me with torchrun)")
    parser.add_argument("--spec", required=True, help="path of the train spec JSON")
    main(parser.parse_args().spec)
