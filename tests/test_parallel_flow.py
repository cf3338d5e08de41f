"""The SFT flow on 2 local @parallel nodes (gloo): it survives a one-time failure through
@retry + checkpoint resume, and its loss curve equals a 1-node, 2-rank run of the same recipe."""

from pathlib import Path

import pytest

from steps import checkpoint, launch, train
from steps.config import load_recipe, recipe_to_dict
from test_flow import run_flow, small_recipe


@pytest.mark.slow
def test_two_nodes_retry_past_a_failure_and_equal_one_node_with_two_ranks(tmp_path, metaflow_env):
    from metaflow import namespace

    recipe_path = small_recipe(
        tmp_path, data={"builtin_num_conversations": 300, "eval_fraction": 0.1},
        train={"num_nodes": 2, "nproc_per_node": 1, "micro_batch_tokens": 512, "global_batch_tokens": 1024,
               "max_steps": 6, "warmup_steps": 1, "lr": 3e-3, "save_every_steps": 3, "log_every_steps": 1,
               "num_threads": 1, "fail_at_step": 5},
        evaluate={"num_task_prompts": 4, "max_new_tokens": 8, "generation_batch_size": 4})
    run = run_flow(recipe_path, metaflow_env)
    namespace(None)
    data = run["join_train"].task.data
    assert [Path(c).name for c in data.checkpoints] == ["step-000003", "step-000006"]
    ckpt_root = Path(data.checkpoints[0]).parent
    # The first attempt failed after step 5; the retry resumed from step 3.
    assert (ckpt_root / ".injected-fail-5").exists()
    node_log = (ckpt_root.parent / "logs" / "train-node0.log").read_text()
    assert "[rank 0] resumed from" in node_log and "step-000003 at step 3" in node_log
    assert (ckpt_root.parent / "logs" / "train-node1.log").read_text().count("[rank 1] ") > 0
    assert checkpoint.read_state(ckpt_root / "step-000006")["world_size"] == 2

    # The same recipe on one node with two ranks, on the same packed tokens.
    recipe = load_recipe(recipe_path)
    recipe.train.fail_at_step = None
    one_node = launch.TrainSpec(recipe=recipe_to_dict(recipe), base_model=data.base_model_path,
                               token_uris=data.token_stats["train"]["uris"],
                               checkpoint_root=str(tmp_path / "one-node"), resume_roots=[],
                               pad_id=_pad_id(data.base_model_path))
    one_node.write(tmp_path / "one-node.json")
    launch.launch(tmp_path / "one-node.json", num_nodes=1, node_rank=0, nproc_per_node=2,
                 master_addr="127.0.0.1", master_port=0)
    expected = checkpoint.read_state(checkpoint.list_checkpoints(tmp_path / "one-node")[-1])["train_curve"]
    assert [r["step"] for r in data.train_curve] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(data.train_curve, expected, strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-5


def _pad_id(model_dir: str) -> int:
    from steps.models import load_tokenizer

    return load_tokenizer(model_dir).pad_token_id
