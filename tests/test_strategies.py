"""Strategies and fine-tuning modes of the trainer on the builtin tiny model: LoRA trains only
the adapter and registers as a merged plain model; FSDP2 equals DDP and resumes exactly; failure
injections fire once; a killed rank fails the launch fast, naming the rank; retention."""

import hashlib
import re
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from steps import checkpoint, launch, train
from conftest import _free_port
from test_train import _final_weights, _recipe, _spec, token_uris  # noqa: F401, F811  (a fixture)


def _lean(tmp_path, **train_fields):
    """2 micro-batches of 2 rows per step: 1 rank accumulates both, 2 ranks take one each."""
    return _recipe(tmp_path, **{"micro_batch_tokens": 512, "global_batch_tokens": 1024, "max_steps": 6,
                                "save_every_steps": 3, "warmup_steps": 1, **train_fields})


def _curve(root):
    return checkpoint.read_state(checkpoint.list_checkpoints(Path(root))[-1])["train_curve"]


def _launch(spec, nproc, log_path=None):
    launch.launch(spec, num_nodes=1, node_rank=0, nproc_per_node=nproc, master_addr="127.0.0.1",
                 master_port=0, log_path=log_path)


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_lora_trains_only_the_adapter_and_exports_a_merged_plain_model(tmp_path, builtin_model_dir, token_uris):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from steps.models import load_model

    lora = {"rank": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
    recipe = _lean(tmp_path, finetune="lora", lora=lora, max_steps=4, save_every_steps=4)
    train.main(str(_spec(recipe, builtin_model_dir, token_uris, tmp_path / "ckpt")))
    ckpt = checkpoint.list_checkpoints(tmp_path / "ckpt")[-1]
    assert checkpoint.is_adapter(ckpt) and not (ckpt / "model.safetensors").exists()
    adapter = load_file(str(ckpt / "adapter_model.safetensors"))
    assert adapter and all(".lora_A." in k or ".lora_B." in k for k in adapter)
    assert {k.split(".")[-3] for k in adapter} == {"q_proj", "v_proj"}
    # lora_B starts at zero, so a non-zero B means the adapter trained.
    assert all(float(v.abs().max()) > 0 for k, v in adapter.items() if ".lora_B." in k)

    merged_dir = checkpoint.export_model(ckpt, tmp_path / "export")
    assert not checkpoint.is_adapter(merged_dir) and (merged_dir / "tokenizer.json").exists()
    base = load_file(str(builtin_model_dir / "model.safetensors"))
    merged = load_file(str(merged_dir / "model.safetensors"))
    assert merged.keys() == base.keys()
    changed = sorted({k.split(".")[-2] for k in base if not torch.equal(base[k], merged[k])})
    assert changed == ["q_proj", "v_proj"]  # only the adapted weights moved; the rest is the base

    ids = torch.tensor([[1, 5, 9, 13, 17, 21, 25, 29]])
    with torch.no_grad():
        plain = AutoModelForCausalLM.from_pretrained(merged_dir).eval()(ids).logits
        with_adapter = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(builtin_model_dir), str(ckpt)).eval()(ids).logits
        # What evaluation loads for a checkpoint: transformers resolves the adapter's base model.
        evaluated = load_model(ckpt).eval()(ids).logits
        base_logits = load_model(builtin_model_dir).eval()(ids).logits
    assert float((plain - with_adapter).abs().max()) <= 1e-5
    assert float((evaluated - with_adapter).abs().max()) == 0.0
    assert float((with_adapter - base_logits).abs().max()) > 1e-3  # and the adapter does something


def test_lora_run_resumes_past_a_one_time_failure_to_the_same_adapter(tmp_path, builtin_model_dir, token_uris):
    lora = {"rank": 4, "alpha": 8.0, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"]}
    full = _lean(tmp_path, finetune="lora", lora=lora)
    train.main(str(_spec(full, builtin_model_dir, token_uris, tmp_path / "full")))
    crashing = _spec(_lean(tmp_path, finetune="lora", lora=lora, fail_at_step=5), builtin_model_dir,
                     token_uris, tmp_path / "resumed")
    with pytest.raises(train.InjectedFailure):
        train.main(str(crashing))
    train.main(str(crashing))  # the same spec again, as @retry does: the injection fired already
    a = load_file(str(checkpoint.list_checkpoints(tmp_path / "full")[-1] / "adapter_model.safetensors"))
    b = load_file(str(checkpoint.list_checkpoints(tmp_path / "resumed")[-1] / "adapter_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in _curve(tmp_path / "full")] == [r["loss"] for r in _curve(tmp_path / "resumed")]


@pytest.mark.slow
def test_lora_under_fsdp2_on_two_ranks_equals_lora_on_one(tmp_path, builtin_model_dir, token_uris):
    # FSDP2 units then mix frozen base weights and trained adapters.
    lora = {"rank": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
    train.main(str(_spec(_lean(tmp_path, finetune="lora", lora=lora), builtin_model_dir, token_uris,
                         tmp_path / "one")))
    _launch(_spec(_lean(tmp_path, finetune="lora", lora=lora, strategy="fsdp2"), builtin_model_dir, token_uris,
                  tmp_path / "fsdp"), 2)
    for a, b in zip(_curve(tmp_path / "one"), _curve(tmp_path / "fsdp"), strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-5
    one, fsdp = (checkpoint.list_checkpoints(tmp_path / name)[-1] for name in ("one", "fsdp"))
    assert checkpoint.is_adapter(fsdp) and not (fsdp / "model.safetensors").exists()
    assert sorted(p.name for p in (fsdp / "optimizer").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert _max_diff(load_file(str(one / "adapter_model.safetensors")),
                     load_file(str(fsdp / "adapter_model.safetensors"))) <= 1e-5


def test_fsdp2_equals_ddp_on_two_ranks_and_resumes_exactly(tmp_path, builtin_model_dir, token_uris):
    ddp = _spec(_lean(tmp_path), builtin_model_dir, token_uris, tmp_path / "ddp")
    fsdp = _spec(_lean(tmp_path, strategy="fsdp2"), builtin_model_dir, token_uris, tmp_path / "fsdp")
    _launch(ddp, 2)
    _launch(fsdp, 2)
    for a, b in zip(_curve(tmp_path / "ddp"), _curve(tmp_path / "fsdp"), strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-5
    ckpt = checkpoint.list_checkpoints(tmp_path / "fsdp")[-1]
    assert sorted(p.name for p in (ckpt / "optimizer").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert _max_diff(_final_weights(tmp_path / "ddp"), _final_weights(tmp_path / "fsdp")) <= 1e-5

    # Fail after step 5 (checkpoint at 3), then relaunch the same spec: it resumes from step 3.
    crashing = _spec(_lean(tmp_path, strategy="fsdp2", fail_at_step=5), builtin_model_dir, token_uris,
                     tmp_path / "resumed")
    with pytest.raises(RuntimeError, match=r"rank \d FAILED: InjectedFailure"):
        _launch(crashing, 2)
    assert [checkpoint.checkpoint_step(p) for p in checkpoint.list_checkpoints(tmp_path / "resumed")] == [3]
    _launch(crashing, 2)
    assert _max_diff(_final_weights(tmp_path / "fsdp"), _final_weights(tmp_path / "resumed")) <= 1e-6
    for a, b in zip(_curve(tmp_path / "fsdp"), _curve(tmp_path / "resumed"), strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-6


def test_a_killed_rank_fails_the_launch_fast_and_names_the_rank(tmp_path, builtin_model_dir, token_uris):
    spec = _spec(_lean(tmp_path, kill_rank_at_step=2), builtin_model_dir, token_uris, tmp_path / "ckpt")
    started = time.monotonic()
    with pytest.raises(RuntimeError) as failure:
        _launch(spec, 2, log_path=tmp_path / "logs" / "train-node0.log")
    assert time.monotonic() - started < 60
    message = str(failure.value)
    assert message.split(": ", 1)[1].startswith("rank 1 (local_rank 1) exited with -9 (SIGKILL) [root cause]"), message
    # Every worker line carries its rank, in the node log and in per-rank files.
    node_log = (tmp_path / "logs" / "train-node0.log").read_text()
    assert "[rank 1] train.kill_rank_at_step=2: rank 1 kills itself (SIGKILL)" in node_log
    assert "[rank 0] step 2/6 loss" in node_log
    rank_files = sorted((tmp_path / "logs" / "ranks-node0").rglob("stdout.log"))
    assert len(rank_files) == 2 and "kills itself" in rank_files[1].read_text()


def test_resume_from_starts_a_fresh_run_at_another_runs_checkpoint(tmp_path, builtin_model_dir, token_uris):
    first = _spec(_lean(tmp_path, max_steps=3), builtin_model_dir, token_uris, tmp_path / "run1" / "checkpoints")
    train.main(str(first))
    # A run root, its checkpoints folder, or one checkpoint folder all name the same start.
    for source in (tmp_path / "run1", tmp_path / "run1" / "checkpoints",
                   tmp_path / "run1" / "checkpoints" / "step-000003"):
        assert checkpoint.latest_checkpoint([source]).name == "step-000003"
    recipe = _lean(tmp_path, resume_from=str(tmp_path / "run1"), keep_last=1, save_every_steps=1)
    roots = launch.resume_roots_for(recipe, origin_run_root=None)
    assert roots == [str(tmp_path / "run1")]
    assert launch.resume_roots_for(recipe, origin_run_root="/store/SFTFlow/17") == [
        "/store/SFTFlow/17/checkpoints", str(tmp_path / "run1")]  # a `resume` also searches its origin
    spec = launch.TrainSpec.read(_spec(recipe, builtin_model_dir, token_uris, tmp_path / "run2"))
    spec.resume_roots = roots
    spec.write(tmp_path / "spec-run2.json")
    train.main(str(tmp_path / "spec-run2.json"))
    assert [r["step"] for r in _curve(tmp_path / "run2")] == [1, 2, 3, 4, 5, 6]  # steps 1-3 from run1
    # keep_last=1: steps 4 and 5 keep their weights (evaluation scores them), not their resume state.
    run2 = checkpoint.list_checkpoints(tmp_path / "run2")
    assert [p.name for p in run2] == ["step-000004", "step-000005", "step-000006"]
    assert [checkpoint.is_resumable(p) for p in run2] == [False, False, True]
    assert checkpoint.latest_checkpoint([tmp_path / "run2"]) == run2[-1]
    for stripped in run2[:2]:
        assert checkpoint.resume_state_files(stripped) == [] and (stripped / "model.safetensors").is_file()
        assert checkpoint.read_state(stripped)["step"] == checkpoint.checkpoint_step(stripped)
    assert [p.name for p in checkpoint.resume_state_files(run2[-1])] == [
        "optimizer.pt", "rng-rank0.pt", "scheduler.pt"]
    # A resume_from with nothing resumable fails, saying why, instead of starting from scratch.
    stale = _spec(_lean(tmp_path, resume_from=str(run2[0])), builtin_model_dir, token_uris, tmp_path / "run3")
    with pytest.raises(RuntimeError, match=r"holds no resumable checkpoint: its 1 checkpoint\(s\) kept only their "
                                           r"weights \(train.keep_last"):
        train.main(str(stale))


def test_prune_keeps_the_newest_and_the_needed(tmp_path):
    for step in (10, 20, 30, 40):
        checkpoint.commit(checkpoint.begin(tmp_path, step), step, {"step": step})
    assert checkpoint.prune(tmp_path, 0) == []
    removed = checkpoint.prune(tmp_path, 2, needed={"step-000010"})
    assert [p.name for p in removed] == ["step-000020"]
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step-000010", "step-000030", "step-000040"]


def test_prune_keeping_weights_drops_only_the_resume_state(tmp_path):
    for step in (10, 20, 30):
        folder = checkpoint.begin(tmp_path, step)
        for name in ("model.safetensors", "config.json", "optimizer.pt", "scheduler.pt", "rng-rank0.pt",
                     "rng-rank1.pt", "optimizer/__0_0.distcp", "deepspeed/mp_rank_00_model_states.pt"):
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text(name)
        checkpoint.commit(folder, step, {"step": step, "train_curve": [{"step": step}]})
    pruned = checkpoint.prune(tmp_path, 1, keep_weights=True)
    assert [p.name for p in pruned] == ["step-000010", "step-000020"]
    for ckpt in pruned:
        assert sorted(p.name for p in ckpt.iterdir()) == ["config.json", "model.safetensors", "trainer_state.json"]
        # The checksums of the kept weights stay (and still verify); the dropped state's are gone.
        kept = {name: {"sha256": hashlib.sha256(name.encode()).hexdigest(), "bytes": len(name)}
                for name in ("config.json", "model.safetensors")}
        assert checkpoint.read_state(ckpt) == {"step": checkpoint.checkpoint_step(ckpt),
                                               "train_curve": [{"step": checkpoint.checkpoint_step(ckpt)}],
                                               "files": kept, "weights_only": True}
    assert checkpoint.latest_checkpoint([tmp_path]).name == "step-000030"
    assert checkpoint.prune(tmp_path, 1, keep_weights=True) == []  # already stripped: nothing new
    # A newer checkpoint moves the resume state on: step 30 keeps only its weights now.
    checkpoint.commit(checkpoint.begin(tmp_path, 40), 40, {"step": 40})
    checkpoint.prune(tmp_path, 1, keep_weights=True)
    assert [checkpoint.is_resumable(p) for p in checkpoint.list_checkpoints(tmp_path)] == [False, False, False, True]


@pytest.mark.deepspeed
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_trains_saves_and_resumes(tmp_path, builtin_model_dir, token_uris, stage):
    """ZeRO-2 resumes to within 1e-6 of an uninterrupted run; ZeRO-3 trains and loads its own
    checkpoint."""
    pytest.importorskip("deepspeed")
    strategy = f"deepspeed_zero{stage}"
    crashing = _spec(_lean(tmp_path, strategy=strategy, fail_at_step=5), builtin_model_dir, token_uris,
                     tmp_path / "resumed")
    with pytest.raises(RuntimeError, match=r"rank \d FAILED: InjectedFailure"):
        _launch(crashing, 2)
    ckpt = checkpoint.list_checkpoints(tmp_path / "resumed")[-1]
    assert checkpoint.checkpoint_step(ckpt) == 3
    optimizer_files = sorted(p.name for p in (ckpt / "deepspeed").glob("*optim_states.pt"))
    assert len(optimizer_files) == 2  # one ZeRO partition per rank
    _launch(crashing, 2, log_path=tmp_path / "logs" / "train-node0.log")
    assert "resumed from" in (tmp_path / "logs" / "train-node0.log").read_text()
    losses = [r["loss"] for r in _curve(tmp_path / "resumed")]
    assert len(losses) == 6 and losses[-1] < losses[0] - 1.0
    resumed = _final_weights(tmp_path / "resumed")
    assert resumed.keys() == load_file(str(builtin_model_dir / "model.safetensors")).keys()
    if stage == 2:
        _launch(_spec(_lean(tmp_path, strategy=strategy), builtin_model_dir, token_uris, tmp_path / "full"), 2)
        assert _max_diff(_final_weights(tmp_path / "full"), resumed) <= 1e-6
        # ZeRO-2 computes the same steps as DDP (same AdamW, same scaling): the curves agree.
        ddp = _spec(_lean(tmp_path), builtin_model_dir, token_uris, tmp_path / "ddp")
        _launch(ddp, 2)
        for a, b in zip(_curve(tmp_path / "ddp"), _curve(tmp_path / "resumed"), strict=True):
            assert abs(a["loss"] - b["loss"]) <= 1e-5


def test_a_node_that_never_starts_fails_the_other_at_the_rendezvous_timeout(tmp_path, builtin_model_dir,
                                                                             token_uris):
    # Node 0 of 2 alone: node 1 died before its torchrun started (a crashed task, a pod never
    # scheduled). Without a rendezvous timeout torchrun would wait 900 s for it.
    spec = _spec(_lean(tmp_path), builtin_model_dir, token_uris, tmp_path / "ckpt")
    started = time.monotonic()
    with pytest.raises(RuntimeError) as failure:
        launch.launch(spec, num_nodes=2, node_rank=0, nproc_per_node=1, master_addr="127.0.0.1",
                     master_port=_free_port(), rendezvous_timeout_s=5)
    assert time.monotonic() - started < 60
    message = str(failure.value)
    assert re.search(r"torchrun on node 0 exited with code 1: rendezvous timed out after [56] s: 1 of 2 nodes joined",
                     message), message
    assert not (tmp_path / "ckpt").exists() or not list((tmp_path / "ckpt").iterdir())
