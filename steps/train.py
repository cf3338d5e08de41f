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

Strategies (``train.strategy``, see :mod:`steps.strategies`): ``ddp``; ``fsdp2`` (``fully_shard``
per decoder layer and the root); ``deepspeed_zero2`` / ``deepspeed_zero3`` (a DeepSpeed engine
around the same AdamW and schedule). All of them scale the loss alike, so on the same recipe and
seed their losses agree (within 1e-5 on CPU). ``train.finetune: lora`` wraps the model with peft
adapters first. gloo on CPU, NCCL on GPU; every process group has a 60 s timeout, so a dead peer
fails the step. What the loss is comes from the objective (:mod:`steps.objectives`).

Checkpoints (see :mod:`steps.checkpoint`) are written every ``save_every_steps`` and at the end;
a started trainer resumes from the latest complete one in its own checkpoint root or in
``resume_roots``. Failure injection for tests (:mod:`steps.faults`): ``train.fail_at_step``
(every rank raises) and ``train.kill_rank_at_step`` (the last rank is SIGKILLed), each once per
checkpoint root.

The trainer is :func:`setup` (geometry, model, objective, strategy, optimizer, resume state),
then :func:`fit`, whose loop body is a few named calls::

    trainer = setup(spec, recipe, rank, world, device)
    fit(trainer, PackedRows(spec.token_uris, recipe.seed, trainer.objective.columns))
    # fit, per optimizer step:
    #     step_batch, step_count = collate_step(trainer, data.step_rows(step, rows_per_step))
    #     sums = forward_backward(trainer, step_batch, step_count)   # this rank's micro-batches
    #     trainer.strategy.step()
    #     loss, metrics = reduce_metrics(trainer, sums, step_count)
    #     log, inject failures, save_checkpoint(trainer, step + 1) on schedule

A trainer with a loop of its own (RL: generate rollouts, score them, train on them) reuses the
same setup, strategy and checkpoints; its objective (registered in ``steps.objectives``) turns
its rows into tensors and a loss module::

    trainer = setup(spec, recipe, rank, world, device)     # resumed from its latest checkpoint
    for step in range(trainer.start_step, recipe.train.max_steps):
        rows = my_rollouts(trainer.model, step)             # the trainer's own data
        step_batch, step_count = collate_step(trainer, rows)
        sums = forward_backward(trainer, step_batch, step_count)
        trainer.strategy.step()
        loss, metrics = reduce_metrics(trainer, sums, step_count)
        trainer.curve.append({"step": step + 1, "loss": loss, **metrics})
        if (step + 1) % recipe.train.save_every_steps == 0:
            save_checkpoint(trainer, step + 1)              # every rank calls it
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch
import torch.distributed as dist

from steps import checkpoint
from steps.config import Recipe, TrainConfig, recipe_from_dict
from steps import efficiency
from steps.faults import FailureInjection, InjectedFailure  # noqa: F401  (tests catch train.InjectedFailure)
from steps.launch import COLLECTIVE_TIMEOUT_S, TrainSpec
from steps.objectives import Objective, objective_for
from steps.strategies import Strategy, decoder_layers, strategy_for


# ---------------------------------------------------------------------------------------------
# What the trainer is made of
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


@dataclass(frozen=True, slots=True)
class BatchGeometry:
    """How the rows of an optimizer step split into micro-batches and over ranks (see above).

    >>> recipe = recipe_from_dict({"tokenize": {"max_seq_tokens": 256},
    ...                            "train": {"micro_batch_tokens": 512, "global_batch_tokens": 2048}})
    >>> g = BatchGeometry.of(recipe, world=2)
    >>> g.rows_per_micro, g.rows_per_step, g.micro_per_step, g.grad_accum
    (2, 8, 4, 2)
    >>> g.micro_batches(rank=1)  # micro-batches 1 and 3 of the step's 4
    [slice(2, 4, None), slice(6, 8, None)]
    """

    row_tokens: int
    rows_per_micro: int
    rows_per_step: int
    world: int

    @classmethod
    def of(cls, recipe: Recipe, world: int) -> BatchGeometry:
        t = recipe.train
        row_tokens = recipe.tokenize.max_seq_tokens
        geometry = cls(row_tokens=row_tokens, rows_per_micro=t.micro_batch_tokens // row_tokens,
                       rows_per_step=t.global_batch_tokens // row_tokens, world=world)
        if geometry.micro_per_step % world:
            raise ValueError(f"train.global_batch_tokens={t.global_batch_tokens} gives {geometry.micro_per_step} "
                             f"micro-batches per step, not divisible by world size {world}")
        return geometry

    @property
    def micro_per_step(self) -> int:
        return self.rows_per_step // self.rows_per_micro

    @property
    def grad_accum(self) -> int:
        """Micro-batches per rank per optimizer step."""
        return self.micro_per_step // self.world

    def micro_batches(self, rank: int) -> list[slice]:
        """The rows of a step batch that ``rank`` trains on, one slice per micro-batch, in order."""
        return [slice(m * self.rows_per_micro, (m + 1) * self.rows_per_micro)
                for m in list(range(self.micro_per_step))[rank::self.world]]


@dataclass(kw_only=True, slots=True, eq=False)
class Trainer:
    """What :func:`setup` built: all that a training loop reads, on one rank."""

    spec: TrainSpec
    recipe: Recipe
    rank: int
    world: int
    device: torch.device
    geometry: BatchGeometry
    objective: Objective
    model: torch.nn.Module
    """The model itself (unwrapped; under FSDP2 its parameters are the shards): checkpoints hold it."""
    real_vocab: int
    """Its vocabulary size without ``train.pad_vocab_multiple``'s padding rows."""
    chunk_tokens: int | None
    """Tokens per chunk of the chunked cross-entropy; None: not chunked."""
    strategy: Strategy
    """Runs forward/backward through the wrapped loss module; holds the optimizer and schedule."""
    tokenizer: Any
    pad_id: int
    checkpoint_root: Path
    start_step: int
    """The data cursor: the first optimizer step to run (0, or the resumed checkpoint's step)."""
    curve: list[dict]
    """The logged rows so far (resumed with the checkpoint); saved in every checkpoint."""
    faults: FailureInjection


def find_resume(spec: TrainSpec, t: TrainConfig) -> Path | None:
    """The latest resumable checkpoint in the run's own checkpoint root or its ``resume_roots``;
    None starts from the base model. Raises when ``train.resume_from`` holds nothing resumable."""
    resume = checkpoint.latest_checkpoint([Path(spec.checkpoint_root)] + [Path(r) for r in spec.resume_roots])
    if resume is None and t.resume_from:
        stripped = checkpoint.list_checkpoints(Path(t.resume_from))
        raise RuntimeError(
            f"train.resume_from={t.resume_from!r} holds no resumable checkpoint"
            + (f": its {len(stripped)} checkpoint(s) kept only their weights (train.keep_last dropped the "
               f"optimizer state); to start from those weights instead, set model.base to one of them"
               if stripped else " (no complete checkpoint there)"))
    return resume


def build_model(spec: TrainSpec, recipe: Recipe, device: torch.device, resume: Path | None):
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


def build_optimizer(model, recipe: Recipe):
    """AdamW over the trainable parameters, and its schedule (:func:`lr_at`)."""
    t = recipe.train
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=t.lr, betas=t.betas, weight_decay=t.weight_decay)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, recipe))


def setup(spec: TrainSpec, recipe: Recipe, rank: int, world: int, device: torch.device) -> Trainer:
    """Everything a training loop needs on this rank, resumed from the latest checkpoint if any.

    The order is part of reproducibility: the seed is set before anything draws random numbers
    (LoRA's initial adapters), and a resumed run then loads the saved RNG state last.
    """
    from steps.models import load_tokenizer

    t = recipe.train
    geometry = BatchGeometry.of(recipe, world)
    ckpt_root = Path(spec.checkpoint_root)
    faults = FailureInjection.arm(ckpt_root, t)

    torch.manual_seed(recipe.seed)
    bf16 = t.dtype == "bfloat16" or (t.dtype == "auto" and device.type == "cuda")
    resume = find_resume(spec, t)
    objective = objective_for(spec.objective, recipe, spec.objective_inputs, device)
    model, real_vocab = build_model(spec, recipe, device, resume)
    chunked = t.chunked_ce == "on" or (t.chunked_ce == "auto" and device.type == "cuda")
    chunk_tokens = t.ce_chunk_tokens if chunked else None
    loss_module = objective.module(model, real_vocab=real_vocab, chunk_tokens=chunk_tokens)
    tokenizer = load_tokenizer(spec.base_model, recipe.model.trust_remote_code)
    pad_id = spec.pad_id if spec.pad_id is not None else tokenizer.pad_token_id
    if pad_id is None:
        raise ValueError(f"the tokenizer of {spec.base_model} has no pad token (tokenize sets one): re-run tokenize")
    if t.compile:  # per decoder layer, before sharding: one graph reused by every layer
        for layer in decoder_layers(model):
            layer.compile()
    strategy = strategy_for(t.strategy, world=world, device=device, bf16=bf16, grad_clip=t.grad_clip,
                            rows_per_micro=geometry.rows_per_micro, grad_accum=geometry.grad_accum)
    strategy.wrap(model, loss_module, lambda: build_optimizer(model, recipe))

    if rank == 0:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        checkpoint.remove_stale_temporaries(ckpt_root)
    start_step, curve = 0, []
    if resume is not None:
        state = checkpoint.read_state(resume)
        strategy.load_optimizer(resume)
        checkpoint.load_rng(resume, rank)
        start_step, curve = state["step"], state["train_curve"]
        _log(rank, f"resumed from {resume} at step {start_step}")
    return Trainer(spec=spec, recipe=recipe, rank=rank, world=world, device=device, geometry=geometry,
                   objective=objective, model=model, real_vocab=real_vocab, chunk_tokens=chunk_tokens,
                   strategy=strategy, tokenizer=tokenizer, pad_id=pad_id, checkpoint_root=ckpt_root,
                   start_step=start_step, curve=curve, faults=faults)


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------

def fit(trainer: Trainer, data: PackedRows) -> None:
    """Train from ``trainer.start_step`` to ``train.max_steps``: log, inject failures, checkpoint."""
    t = trainer.recipe.train
    if trainer.rank == 0:
        _log_banner(trainer, data)
    trainer.model.train()
    progress = Progress(trainer)
    for step in range(trainer.start_step, t.max_steps):
        rows = data.step_rows(step, trainer.geometry.rows_per_step)
        step_batch, step_count = collate_step(trainer, rows)
        progress.add_step(rows, step_batch)
        sums = forward_backward(trainer, step_batch, step_count)
        trainer.strategy.step()
        loss, metrics = reduce_metrics(trainer, sums, step_count)
        done = step + 1
        progress.log_step(done, loss, metrics)
        trainer.faults.after_step(done, trainer.rank, trainer.world)
        if done % t.save_every_steps == 0 or done == t.max_steps:
            save_checkpoint(trainer, done)


def collate_step(trainer: Trainer, rows: list[dict]) -> tuple[dict[str, torch.Tensor], int]:
    """One optimizer step's rows as the objective's tensors, and what the step's summed loss is
    divided by (its count of trained tokens, or pairs; at least 1)."""
    step_batch = trainer.objective.collate(rows, trainer.geometry.row_tokens, trainer.pad_id)
    return step_batch, max(1, trainer.objective.count(step_batch))


def forward_backward(trainer: Trainer, step_batch: dict[str, torch.Tensor], step_count: int
                     ) -> dict[str, torch.Tensor]:
    """Forward and backward over this rank's micro-batches of one step batch (gradients reduced
    over ranks after the last); returns this rank's sums of the loss and the objective's metrics."""
    strategy, device = trainer.strategy, trainer.device
    micro_batches = trainer.geometry.micro_batches(trainer.rank)
    sums: dict[str, torch.Tensor] = {}
    for i, micro in enumerate(micro_batches):
        batch = {k: v[micro].to(device) for k, v in step_batch.items()}
        with strategy.gradient_sync(i == len(micro_batches) - 1), \
                torch.autocast(device.type, dtype=torch.bfloat16, enabled=strategy.autocast):
            out = strategy.module(**batch)
            out = out if isinstance(out, dict) else {"loss": out}
            # DDP, FSDP2 and ZeRO average gradients over ranks; scale by world so the step's
            # gradient is the mean over the whole global batch (every trained token, or pair).
            scaled = out["loss"] * trainer.world / step_count
        strategy.backward(scaled)
        for name, value in out.items():
            sums[name] = sums.get(name, 0) + value.detach().float()
    return sums


def reduce_metrics(trainer: Trainer, sums: dict[str, torch.Tensor], step_count: int
                   ) -> tuple[float, dict[str, float]]:
    """The step's loss and metrics: every rank's sums added up, divided by ``step_count``."""
    names = sorted(sums)
    totals = torch.stack([torch.as_tensor(sums[n], device=trainer.device) for n in names])
    if trainer.world > 1:
        dist.all_reduce(totals)
    metrics = {n: v / step_count for n, v in zip(names, totals.tolist())}
    return metrics.pop("loss"), metrics


def _log_banner(trainer: Trainer, data: PackedRows) -> None:
    t, model, g = trainer.recipe.train, trainer.model, trainer.geometry
    num_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    _log(trainer.rank, f"{sum(p.numel() for p in model.parameters()):,} parameters ({num_trainable:,} trained, "
                       f"{t.finetune}), {len(data)} packed rows, {t.strategy} on world {trainer.world}, "
                       f"{g.grad_accum} micro-batch(es) of {g.rows_per_micro} rows per rank per step, "
                       f"{'bf16 autocast' if trainer.strategy.autocast else 'fp32'} on {trainer.device.type} "
                       f"({efficiency.device_name(trainer.device)}), "
                       f"attention {model.config._attn_implementation}, loss {trainer.spec.objective}"
                       f"{f' with chunked CE ({trainer.chunk_tokens} tokens)' if trainer.chunk_tokens else ''}"
                       f"{f', vocab padded {trainer.real_vocab} -> {model.get_input_embeddings().weight.shape[0]}' if t.pad_vocab_multiple else ''}")


class Progress:
    """The per-step log line (rank 0) and the curve row of every logged step, with throughput
    and the ETA. The curve has the same rows whether or not the run was resumed."""

    def __init__(self, trainer: Trainer):
        self.trainer = trainer
        self.throughput = Throughput(trainer.model, trainer.real_vocab, trainer.device, trainer.world)
        self.run_start, self.steps_timed = time.perf_counter(), 0

    def add_step(self, rows: list[dict], step_batch: dict[str, torch.Tensor]) -> None:
        self.throughput.add_step(rows, step_batch["input_ids"] != self.trainer.pad_id)

    def log_step(self, done: int, loss: float, metrics: dict[str, float]) -> None:
        trainer, t = self.trainer, self.trainer.recipe.train
        lr = trainer.strategy.optimizer.param_groups[0]["lr"]
        self.steps_timed += 1
        on_schedule = done % t.log_every_steps == 0 or done == t.max_steps
        if on_schedule or done == trainer.start_step + 1:  # also print the first step, as a sign of life
            window = self.throughput.window()
            eta_s = (time.perf_counter() - self.run_start) / self.steps_timed * (t.max_steps - done)
            if on_schedule:
                trainer.curve.append({"step": done, "loss": loss, "lr": lr, **window, **metrics})
            if trainer.rank == 0:
                extra = "".join(f" {n} {v:.4f}" for n, v in metrics.items())
                mfu_text = f" MFU {100 * window['mfu']:.1f}%" if window["mfu"] is not None else ""
                _log(trainer.rank, f"step {done}/{t.max_steps} loss {loss:.4f}{extra} lr {lr:.2e} "
                                   f"tokens/s {window['tokens_per_s']:,.0f} TFLOP/s/device "
                                   f"{window['tflops_per_device']:.3g}{mfu_text} ETA {eta_s:,.0f}s")


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


def save_checkpoint(trainer: Trainer, step: int) -> Path | None:
    """Write the checkpoint of ``step``: every rank takes part, rank 0 publishes it when all are
    done (and returns its path; other ranks return None).

    Rank 0 writes the weights (full safetensors, gathered from the shards under FSDP2 and
    ZeRO-3), the tokenizer and the scheduler; the optimizer state is one file from rank 0, one
    DCP shard per rank under FSDP2, or DeepSpeed's own per-rank files (the strategy's
    ``save_optimizer``); every rank adds its RNG state.
    """
    rank, world, root = trainer.rank, trainer.world, trainer.checkpoint_root
    keep_last = trainer.recipe.train.keep_last
    tmp = checkpoint.begin(root, step) if rank == 0 else None
    if world > 1:
        names = [str(tmp) if tmp else None]
        dist.broadcast_object_list(names, src=0)
        tmp = Path(names[0])
    checkpoint.save_weights(trainer.model, tmp, is_writer=rank == 0, layout=trainer.strategy.layout,
                            real_vocab=trainer.real_vocab)
    trainer.strategy.save_optimizer(tmp, is_writer=rank == 0)
    if rank == 0:
        trainer.tokenizer.save_pretrained(tmp)
    checkpoint.save_rng(tmp, rank)
    if world > 1:
        dist.barrier()
    if rank != 0:
        return None
    final = checkpoint.commit(tmp, step, {"step": step, "train_curve": trainer.curve, "world_size": world})
    _log(rank, f"saved checkpoint {final}")
    for pruned in checkpoint.prune(root, keep_last, keep_weights=True):
        _log(rank, f"dropped the resume state of {pruned} (train.keep_last={keep_last}); its weights stay "
                   f"for evaluation")
    return final


# ---------------------------------------------------------------------------------------------
# The entrypoint
# ---------------------------------------------------------------------------------------------

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
        trainer = setup(spec, recipe, rank, world, device)
        fit(trainer, PackedRows(spec.token_uris, recipe.seed, trainer.objective.columns))
    except Exception as err:
        _log(rank, f"rank {rank} FAILED: {type(err).__name__}: {err}")
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="posttrain trainer (run me with torchrun)")
    parser.add_argument("--spec", required=True, help="path of the train spec JSON")
    main(parser.parse_args().spec)
