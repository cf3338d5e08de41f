"""Data-parallel strategies (``train.strategy``) behind one Protocol, so a training loop has no
strategy branches.

=====================  ================================================  =========================
strategy               the module that runs forward/backward             optimizer state on disk
=====================  ================================================  =========================
``ddp``                the loss module; DDP around it on several ranks   ``optimizer.pt`` (rank 0)
``fsdp2`` (world > 1)  the loss module, ``fully_shard`` per decoder      DCP shards, one per rank
                       layer and at the root                             (``optimizer/``)
``deepspeed_zero2/3``  a DeepSpeed ZeRO engine around the loss module,   DeepSpeed's own files
                       the same AdamW and schedule                       (``deepspeed/``)
=====================  ================================================  =========================

``fsdp2`` on one rank is the plain single-process strategy (``ddp`` on one rank). What a loop
calls, for every strategy alike::

    strategy = strategy_for(t.strategy, world=..., device=..., bf16=..., grad_clip=..., ...)
    strategy.wrap(model, loss_module, lambda: build_optimizer(model, recipe))
    for step in ...:
        for i, micro_batch in enumerate(my_micro_batches):
            with strategy.gradient_sync(i == last), torch.autocast(..., enabled=strategy.autocast):
                loss = strategy.module(**micro_batch)
            strategy.backward(loss)
        strategy.step()                          # clip, optimizer and schedule step, zero the grads
    strategy.save_optimizer(folder, is_writer=rank == 0)   # optimizer and schedule; every rank calls it
    strategy.load_optimizer(folder)              # on resume

Every strategy averages gradients over ranks, so the loop scales each rank's loss by the world
size (see :mod:`steps.train`); on the same recipe and seed their losses agree.
"""

from __future__ import annotations

import contextlib
import os
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Callable, Protocol

import torch

from steps import checkpoint

OptimizerFactory = Callable[[], tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]]
"""Builds the optimizer and its LR schedule over the model's trainable parameters; a strategy
calls it after sharding (FSDP2 replaces the parameters) and before building an engine."""


class Strategy(Protocol):
    layout: str
    """How ``checkpoint.save_weights`` gathers the weights: ``full``, ``fsdp2`` or ``deepspeed``."""
    autocast: bool
    """Whether the forward runs under bf16 autocast (DeepSpeed's bf16 mode casts the model instead)."""
    module: torch.nn.Module
    """What runs forward and backward (set by :meth:`wrap`)."""
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler

    def wrap(self, model: torch.nn.Module, loss_module: torch.nn.Module,
             make_optimizer: OptimizerFactory) -> None:
        """Distribute ``loss_module`` (which holds ``model``) and build the optimizer for it."""

    def gradient_sync(self, sync: bool) -> AbstractContextManager:
        """A context for a micro-batch's forward: gradients are reduced over ranks only when
        ``sync`` (the rank's last micro-batch of the step)."""

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self) -> None:
        """End the optimizer step: clip, step the optimizer and the schedule, zero the gradients."""

    def save_optimizer(self, folder: Path, *, is_writer: bool) -> None:
        """Write the optimizer and schedule state into a checkpoint folder; every rank calls it."""

    def load_optimizer(self, folder: Path) -> None:
        """Restore what :meth:`save_optimizer` wrote."""


def strategy_for(name: str, *, world: int, device: torch.device, bf16: bool, grad_clip: float,
                 rows_per_micro: int, grad_accum: int) -> Strategy:
    """The strategy ``train.strategy`` names, for ``world`` ranks.

    >>> cpu = dict(device=torch.device("cpu"), bf16=False, grad_clip=1.0, rows_per_micro=2, grad_accum=1)
    >>> [type(strategy_for(n, world=w, **cpu)).__name__ for n, w in [("ddp", 1), ("fsdp2", 1), ("fsdp2", 2)]]
    ['DDPStrategy', 'DDPStrategy', 'FSDP2Strategy']
    >>> strategy_for("deepspeed_zero3", world=2, **cpu).layout
    'deepspeed'
    """
    if name.startswith("deepspeed"):
        return DeepSpeedStrategy(stage=3 if name == "deepspeed_zero3" else 2, bf16=bf16, grad_clip=grad_clip,
                                 rows_per_micro=rows_per_micro, grad_accum=grad_accum)
    if name == "fsdp2" and world > 1:
        return FSDP2Strategy(device=device, bf16=bf16, grad_clip=grad_clip)
    return DDPStrategy(world=world, device=device, bf16=bf16, grad_clip=grad_clip)


def decoder_layers(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks of a model (or of a module holding one), by class name
    (``LlamaDecoderLayer``, ``Qwen2DecoderLayer``, ...): the units that are compiled and sharded."""
    return [m for m in module.modules() if type(m).__name__.endswith("DecoderLayer")]


class DDPStrategy:
    """Replicated weights: DistributedDataParallel around the loss module, or on one rank the loss
    module itself. One copy of the optimizer state, written by rank 0."""

    layout = "full"

    def __init__(self, *, world: int, device: torch.device, bf16: bool, grad_clip: float):
        self.world, self.device, self.grad_clip, self.autocast = world, device, grad_clip, bf16

    def wrap(self, model, loss_module, make_optimizer: OptimizerFactory) -> None:
        self.model = model
        self.module = loss_module if self.world == 1 else torch.nn.parallel.DistributedDataParallel(
            loss_module, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.optimizer, self.scheduler = make_optimizer()

    def gradient_sync(self, sync: bool) -> AbstractContextManager:
        # DDP's no_sync() must cover the forward: the forward decides whether backward reduces.
        return contextlib.nullcontext() if sync or self.world == 1 else self.module.no_sync()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        _optimizer_step(self.optimizer, self.scheduler, self.grad_clip)

    def save_optimizer(self, folder: Path, *, is_writer: bool) -> None:
        _save_optimizer_and_schedule(self, folder, is_writer=is_writer, sharded=False)

    def load_optimizer(self, folder: Path) -> None:
        _load_optimizer_and_schedule(self, folder, sharded=False)


class FSDP2Strategy:
    """Sharded weights: one ``fully_shard`` unit per decoder layer, then the root (embeddings,
    norm, head, and the loss that uses the head), so each layer's parameters are gathered just
    before its forward and freed after it. The optimizer state is saved as DCP shards, one per
    rank, which a resume on another world size reshards."""

    layout = "fsdp2"

    def __init__(self, *, device: torch.device, bf16: bool, grad_clip: float):
        self.device, self.grad_clip, self.autocast = device, grad_clip, bf16

    def wrap(self, model, loss_module, make_optimizer: OptimizerFactory) -> None:
        from torch.distributed.fsdp import fully_shard

        self.model = model
        for layer in decoder_layers(loss_module):
            fully_shard(layer)
        fully_shard(loss_module)
        self.module = loss_module
        self.optimizer, self.scheduler = make_optimizer()

    def gradient_sync(self, sync: bool) -> AbstractContextManager:
        self.module.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        _optimizer_step(self.optimizer, self.scheduler, self.grad_clip)

    def save_optimizer(self, folder: Path, *, is_writer: bool) -> None:
        _save_optimizer_and_schedule(self, folder, is_writer=is_writer, sharded=True)

    def load_optimizer(self, folder: Path) -> None:
        _load_optimizer_and_schedule(self, folder, sharded=True)


class DeepSpeedStrategy:
    """A DeepSpeed ZeRO engine (stage 2: optimizer state and gradients partitioned; stage 3: the
    parameters too) around the loss module, with our AdamW and LR schedule. DeepSpeed owns the
    optimizer step, gradient reduction, clipping and the schedule.

    The optimizer is torch's AdamW, as for DDP and FSDP2 (DeepSpeed's fused CPU Adam would be
    compiled on first use and gives slightly different numbers).
    """

    layout = "deepspeed"
    autocast = False  # DeepSpeed's bf16 mode casts the model itself; no autocast on top

    def __init__(self, *, stage: int, bf16: bool, grad_clip: float, rows_per_micro: int, grad_accum: int):
        self.config = {
            "train_micro_batch_size_per_gpu": rows_per_micro,
            "gradient_accumulation_steps": grad_accum,
            "zero_optimization": {"stage": stage},
            "zero_allow_untested_optimizer": True,
            "gradient_clipping": grad_clip,
            "bf16": {"enabled": bf16},
            "steps_per_print": 2**31 - 1,
        }

    def wrap(self, model, loss_module, make_optimizer: OptimizerFactory) -> None:
        self.optimizer, self.scheduler = make_optimizer()
        if not torch.cuda.is_available():
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed

        if deepspeed.get_accelerator().device_name() == "cpu":
            # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce op (~1 min of g++) when
            # its comm backend starts; only `inference_all_reduce` (tensor-parallel inference) uses
            # it, never ZeRO training, whose collectives go through torch.distributed (gloo).
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        self.module, *_ = deepspeed.initialize(model=loss_module, optimizer=self.optimizer,
                                               lr_scheduler=self.scheduler, config=self.config,
                                               dist_init_required=False)

    def gradient_sync(self, sync: bool) -> AbstractContextManager:
        return contextlib.nullcontext()  # the engine decides from its gradient_accumulation_steps

    def backward(self, loss: torch.Tensor) -> None:
        self.module.backward(loss, scale_wrt_gas=False)  # the loop's scale already covers accumulation
        self.module.step()  # steps the optimizer only at the accumulation boundary

    def step(self) -> None:
        pass  # the engine stepped at the boundary, in backward()

    def save_optimizer(self, folder: Path, *, is_writer: bool) -> None:
        checkpoint.save_deepspeed(self.module, folder)
        # scheduler.pt too, as the other strategies write it (a resume reads the engine's own copy)
        _save_schedule(self.scheduler, folder, is_writer=is_writer)

    def load_optimizer(self, folder: Path) -> None:
        checkpoint.load_deepspeed(self.module, folder)


def _optimizer_step(optimizer, scheduler, grad_clip: float) -> None:
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]],
                                       grad_clip)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def _save_schedule(scheduler, folder: Path, *, is_writer: bool) -> None:
    if is_writer:
        torch.save(scheduler.state_dict(), Path(folder) / "scheduler.pt")


def _save_optimizer_and_schedule(strategy: DDPStrategy | FSDP2Strategy, folder: Path, *, is_writer: bool,
                                 sharded: bool) -> None:
    checkpoint.save_optimizer(strategy.model, strategy.optimizer, folder, is_writer=is_writer, sharded=sharded)
    _save_schedule(strategy.scheduler, folder, is_writer=is_writer)


def _load_optimizer_and_schedule(strategy: DDPStrategy | FSDP2Strategy, folder: Path, *, sharded: bool) -> None:
    checkpoint.load_optimizer(strategy.model, strategy.optimizer, folder, sharded=sharded, device=strategy.device)
    strategy.scheduler.load_state_dict(torch.load(Path(folder) / "scheduler.pt", weights_only=True))
