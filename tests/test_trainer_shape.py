"""The trainer's parts, one at a time: each strategy on a small module (the single-process
strategy steps as plain AdamW with clipping and a schedule; DDP and FSDP2 over 2 ranks and
DeepSpeed ZeRO-2 on one step like it; saved optimizer state continues exactly), the batch
geometry, failure injection, and a loop of its own built from setup's parts, as an RL trainer
will build one, training exactly like fit."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from steps import checkpoint, faults, strategies, train
from steps.config import recipe_from_dict
from conftest import _free_port
from test_train import _final_weights, _recipe, _spec, token_uris  # noqa: F401  (a fixture)

WIDTH, LR, GRAD_CLIP = 8, 0.05, 0.5
NUM_STEPS, NUM_MICRO = 2, 4  # NUM_MICRO: micro-batches per optimizer step, over all ranks


class MLPDecoderLayer(torch.nn.Module):
    """Named like a transformer block, so FSDP2 shards it as one unit."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(WIDTH, WIDTH)

    def forward(self, h):
        return h + torch.tanh(self.linear(h))


class StackedModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList([MLPDecoderLayer(), MLPDecoderLayer()])
        self.head = torch.nn.Linear(WIDTH, 1)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.head(x).squeeze(-1)


class SquaredErrorLoss(torch.nn.Module):
    """An objective's loss module: it holds the model and returns the micro-batch's summed loss."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, y):
        return ((self.model(x) - y) ** 2).sum()


def _micro_batch(step: int, m: int) -> dict:
    g = torch.Generator().manual_seed(100 * step + m)
    return {"x": torch.randn(4, WIDTH, generator=g), "y": torch.randn(4, generator=g)}


def _make_optimizer(model):
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), weight_decay=0.1)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (s + 1))


def _wrapped(strategy, seed: int = 0):
    torch.manual_seed(seed)
    model = StackedModel()
    strategy.wrap(model, SquaredErrorLoss(model), lambda: _make_optimizer(model))
    return model


def _run(strategy, model, rank: int = 0, world: int = 1, steps=range(NUM_STEPS)) -> list[float]:
    """Optimizer steps as train.forward_backward runs them: this rank's micro-batches ``m % world
    == rank``, gradients reduced after its last one, each loss scaled by world / count."""
    losses = []
    for step in steps:
        mine = list(range(NUM_MICRO))[rank::world]
        for i, m in enumerate(mine):
            with strategy.gradient_sync(i == len(mine) - 1):
                loss = strategy.module(**_micro_batch(step, m))
            strategy.backward(loss * world / (4 * NUM_MICRO))
            losses.append(float(loss.detach()))
        strategy.step()
    return losses


def _full_params(model) -> dict:
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
            for k, v in model.named_parameters()}


def _single(grad_clip: float = GRAD_CLIP) -> strategies.Strategy:
    return strategies.strategy_for("ddp", world=1, device=torch.device("cpu"), bf16=False, grad_clip=grad_clip,
                                   rows_per_micro=4, grad_accum=NUM_MICRO)


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_single_process_strategy_steps_like_plain_adamw_with_clipping_and_schedule():
    strategy = _single()
    model = _wrapped(strategy)
    assert strategy.module.model is model and strategy.layout == "full" and not strategy.autocast
    losses = _run(strategy, model)

    torch.manual_seed(0)
    reference = StackedModel()
    optimizer, scheduler = _make_optimizer(reference)
    expected = []
    for step in range(NUM_STEPS):
        for m in range(NUM_MICRO):
            loss = SquaredErrorLoss(reference)(**_micro_batch(step, m))
            (loss / (4 * NUM_MICRO)).backward()
            expected.append(float(loss))
        torch.nn.utils.clip_grad_norm_(list(reference.parameters()), GRAD_CLIP)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    assert losses == expected
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), reference.parameters()))
    assert all(p.grad is None for p in model.parameters())  # zeroed for the next step
    assert strategy.optimizer.param_groups[0]["lr"] == LR / (NUM_STEPS + 1)  # the schedule stepped


def _norm(tensors) -> float:
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in tensors])))


def test_step_clips_the_gradient_norm_unless_grad_clip_is_zero():
    seen = {}
    for clip in (0.0, 1e-3):
        strategy = _single(grad_clip=clip)
        model = _wrapped(strategy)
        strategy.backward(strategy.module(**_micro_batch(0, 0)))
        grad_norm = _norm(p.grad for p in model.parameters())
        strategy.step()
        # AdamW's first moment after one step is (1 - beta1) * the gradient it stepped with.
        stepped_norm = _norm(strategy.optimizer.state[p]["exp_avg"] for p in model.parameters()) / (1 - 0.9)
        seen[clip] = grad_norm, stepped_norm
    assert seen[0.0][1] == pytest.approx(seen[0.0][0], rel=1e-5)
    assert seen[1e-3][0] > 1e-2 and seen[1e-3][1] == pytest.approx(1e-3, rel=1e-4)


def test_saved_optimizer_state_continues_exactly(tmp_path):
    strategy = _single()
    model = _wrapped(strategy)
    _run(strategy, model, steps=[0])
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    strategy.save_optimizer(tmp_path, is_writer=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["optimizer.pt", "scheduler.pt"]
    continued = _run(strategy, model, steps=[1])

    resumed_strategy = _single()
    resumed = _wrapped(resumed_strategy, seed=1)  # other initial weights: all of them are replaced
    resumed.load_state_dict(weights)
    resumed_strategy.load_optimizer(tmp_path)
    assert _run(resumed_strategy, resumed, steps=[1]) == continued
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), resumed.parameters()))
    assert resumed_strategy.optimizer.param_groups[0]["lr"] == strategy.optimizer.param_groups[0]["lr"]


def _two_rank_worker(rank: int, port: int, out: str) -> None:
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        results = {}
        for name in ("ddp", "fsdp2"):
            strategy = strategies.strategy_for(name, world=2, device=torch.device("cpu"), bf16=False,
                                               grad_clip=GRAD_CLIP, rows_per_micro=4, grad_accum=1)
            model = _wrapped(strategy)
            reductions = []
            if name == "ddp":  # count DDP's gradient all-reduces (one bucket: the model is small)
                def count(state, bucket):
                    reductions.append(1)
                    return default_hooks.allreduce_hook(state, bucket)
                strategy.module.register_comm_hook(None, count)
            losses = _run(strategy, model, rank=rank, world=2)
            results[name] = {"layout": strategy.layout, "losses": losses, "params": _full_params(model),
                             "reductions": len(reductions)}
        torch.save(results, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_and_fsdp2_on_two_ranks_step_like_one_process_reducing_once_per_step(tmp_path):
    torch.multiprocessing.spawn(_two_rank_worker, args=(_free_port(), str(tmp_path)), nprocs=2)
    strategy = _single()
    model = _wrapped(strategy)
    losses = _run(strategy, model)
    single = _full_params(model)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    for name, layout in (("ddp", "full"), ("fsdp2", "fsdp2")):
        assert ranks[0][name]["layout"] == layout
        # Rank r trained micro-batches r and r + 2 of each step; together, every micro-batch once.
        assert sorted(ranks[0][name]["losses"] + ranks[1][name]["losses"]) == pytest.approx(sorted(losses), abs=1e-6)
        for rank in ranks:
            assert _max_diff(rank[name]["params"], single) <= 1e-6
    # Each rank accumulated 2 micro-batches per step and reduced the gradients once, after the last.
    assert [rank["ddp"]["reductions"] for rank in ranks] == [NUM_STEPS, NUM_STEPS]


@pytest.mark.deepspeed
def test_deepspeed_zero2_on_one_rank_steps_like_one_process_and_resumes(tmp_path, monkeypatch):
    pytest.importorskip("deepspeed")
    port = _free_port()
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(key, value)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        def zero2():
            return strategies.strategy_for("deepspeed_zero2", world=1, device=torch.device("cpu"), bf16=False,
                                           grad_clip=GRAD_CLIP, rows_per_micro=4, grad_accum=NUM_MICRO)

        strategy = zero2()
        model = _wrapped(strategy)
        assert strategy.layout == "deepspeed" and not strategy.autocast
        _run(strategy, model, steps=[0])
        strategy.save_optimizer(tmp_path, is_writer=True)
        weights = {k: v.clone() for k, v in model.state_dict().items()}
        assert (tmp_path / "deepspeed").is_dir() and (tmp_path / "scheduler.pt").is_file()
        _run(strategy, model, steps=[1])

        reference = _single()
        reference_model = _wrapped(reference)
        _run(reference, reference_model)
        assert _max_diff(_full_params(model), _full_params(reference_model)) <= 1e-6

        resumed_strategy = zero2()
        resumed = _wrapped(resumed_strategy, seed=1)
        resumed_strategy.load_optimizer(tmp_path)  # the engine's own checkpoint holds the module too
        assert all(torch.equal(weights[k], v) for k, v in resumed.state_dict().items())
        _run(resumed_strategy, resumed, steps=[1])
        assert _max_diff(_full_params(resumed), _full_params(model)) == 0.0
    finally:
        dist.destroy_process_group()


def test_strategy_names_pick_their_implementation():
    cpu = dict(device=torch.device("cpu"), bf16=True, grad_clip=1.0, rows_per_micro=2, grad_accum=1)
    picked = {(name, world): strategies.strategy_for(name, world=world, **cpu)
              for name in ("ddp", "fsdp2", "deepspeed_zero2", "deepspeed_zero3") for world in (1, 2)}
    assert {key: type(s).__name__ for key, s in picked.items()} == {
        ("ddp", 1): "DDPStrategy", ("ddp", 2): "DDPStrategy",
        ("fsdp2", 1): "DDPStrategy", ("fsdp2", 2): "FSDP2Strategy",  # one rank: nothing to shard
        ("deepspeed_zero2", 1): "DeepSpeedStrategy", ("deepspeed_zero2", 2): "DeepSpeedStrategy",
        ("deepspeed_zero3", 1): "DeepSpeedStrategy", ("deepspeed_zero3", 2): "DeepSpeedStrategy"}
    assert picked["deepspeed_zero3", 2].config["zero_optimization"] == {"stage": 3}
    assert picked["deepspeed_zero2", 2].config["zero_optimization"] == {"stage": 2}
    # bf16: autocast for DDP and FSDP2; DeepSpeed casts the model itself.
    assert [picked[n, 2].autocast for n in ("ddp", "fsdp2", "deepspeed_zero2")] == [True, True, False]


def test_batch_geometry_rejects_a_world_size_that_does_not_divide_the_step():
    recipe = recipe_from_dict({"tokenize": {"max_seq_tokens": 256},
                               "train": {"micro_batch_tokens": 512, "global_batch_tokens": 1536}})
    assert train.BatchGeometry.of(recipe, world=3).micro_batches(2) == [slice(4, 6)]
    with pytest.raises(ValueError, match=r"train.global_batch_tokens=1536 gives 3 micro-batches per step, "
                                         r"not divisible by world size 2"):
        train.BatchGeometry.of(recipe, world=2)


def test_an_injected_failure_fires_once_per_checkpoint_root(tmp_path):
    t = recipe_from_dict({"train": {"fail_at_step": 2}}).train
    injection = faults.FailureInjection.arm(tmp_path / "ckpt", t)
    injection.after_step(1, rank=0, world=2)  # not yet
    with pytest.raises(faults.InjectedFailure, match=r"train.fail_at_step=2: injected failure after step 2"):
        injection.after_step(2, rank=1, world=2)
    assert not (tmp_path / "ckpt").exists()  # rank 0 leaves the mark, once
    with pytest.raises(faults.InjectedFailure):
        injection.after_step(2, rank=0, world=2)
    assert train.InjectedFailure is faults.InjectedFailure
    again = faults.FailureInjection.arm(tmp_path / "ckpt", t)  # the retried run gets past it
    again.after_step(2, rank=0, world=2)


def test_a_rank_kill_hits_only_the_last_rank_and_only_once(tmp_path):
    code = ("import sys; from pathlib import Path; from steps.config import recipe_from_dict; "
            "from steps.faults import FailureInjection; "
            "t = recipe_from_dict({'train': {'kill_rank_at_step': 3}}).train; "
            "FailureInjection.arm(Path(sys.argv[1]), t).after_step(3, rank=int(sys.argv[2]), world=2)")
    root = Path(__file__).resolve().parent.parent
    run = lambda rank: subprocess.run([sys.executable, "-c", code, str(tmp_path), str(rank)], cwd=root,  # noqa: E731
                                      capture_output=True, text=True, timeout=120)
    assert run(0).returncode == 0  # rank 0 of 2 survives
    killed = run(1)
    assert killed.returncode == -9 and "train.kill_rank_at_step=3: rank 1 kills itself (SIGKILL)" in killed.stdout
    assert (tmp_path / ".injected-kill-3").exists()
    assert run(1).returncode == 0  # fired already


def test_a_loop_of_its_own_from_setups_parts_trains_exactly_like_fit(tmp_path, builtin_model_dir, token_uris):
    """What an RL trainer will do (see steps/train.py's docstring): setup, then its own loop over
    collate_step / forward_backward / strategy.step / reduce_metrics, then save_checkpoint."""
    recipe = _recipe(tmp_path, micro_batch_tokens=512, global_batch_tokens=1024, max_steps=3,
                     save_every_steps=3, warmup_steps=1)
    train.main(str(_spec(recipe, builtin_model_dir, token_uris, tmp_path / "fit")))  # sets 1 thread too

    spec = train.TrainSpec.read(_spec(recipe, builtin_model_dir, token_uris, tmp_path / "own"))
    trainer = train.setup(spec, recipe, rank=0, world=1, device=torch.device("cpu"))
    assert (trainer.start_step, trainer.geometry.grad_accum, trainer.strategy.layout) == (0, 2, "full")
    data = train.PackedRows(spec.token_uris, recipe.seed, trainer.objective.columns)
    trainer.model.train()
    for step in range(trainer.start_step, recipe.train.max_steps):
        step_batch, step_count = train.collate_step(trainer, data.step_rows(step, trainer.geometry.rows_per_step))
        sums = train.forward_backward(trainer, step_batch, step_count)
        trainer.strategy.step()
        loss, metrics = train.reduce_metrics(trainer, sums, step_count)
        trainer.curve.append({"step": step + 1, "loss": loss, **metrics})
    final = train.save_checkpoint(trainer, recipe.train.max_steps)

    assert final == tmp_path / "own" / "step-000003"
    fit_curve = checkpoint.read_state(checkpoint.list_checkpoints(tmp_path / "fit")[-1])["train_curve"]
    assert [r["loss"] for r in trainer.curve] == [r["loss"] for r in fit_curve]
    a, b = _final_weights(tmp_path / "fit"), _final_weights(tmp_path / "own")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # The checkpoint resumes like fit's: a setup on the same root continues after step 3.
    assert train.setup(spec, recipe, rank=0, world=1, device=torch.device("cpu")).start_step == 3
