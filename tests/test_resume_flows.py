"""Every flow resumes the same way: a train step that crashes is retried, then `resume` finishes it.

    python flows/<flow>.py --config recipe my.yaml run          # train fails twice (@retry once)
    python flows/<flow>.py resume --origin-run-id <run id>      # continues from the checkpoint

Each test makes the origin run fail in its train step (an exception after step 9, when step 6
is saved; its @retry resumes from step 6 and is SIGKILLed after step 11), resumes it, and checks:
the resumed train step continued from step 6 of the origin run (its log says so), and its final
weights equal, bit for bit, those of the same training run once without interruption (the
train step run again on the resumed run's token shards, in a folder of its own).
"""

from pathlib import Path

import pytest
import yaml

from conftest import PROJECT_ROOT
from test_flow import tiny_recipe

# Step 6 is saved before the first crash (after step 9); the retry resumes from it and dies
# after step 11, before step 12 is saved; `resume` continues from step 6 again.
CRASHES = {"fail_at_step": 9, "kill_rank_at_step": 11, "save_every_steps": 6, "max_steps": 12}
RESUMED_FROM_6 = "step-000006 at step 6"


def fail_then_resume(flow: str, recipe: Path, tmp_path: Path, first_failure: str = "after step 9"
                     ) -> tuple[str, str, object]:
    """Run ``flows/<flow>``, which must fail in train (``injected failure <first_failure>`` first);
    resume it without --config (Metaflow takes the origin run's recipe, and refuses a new one).
    Checks that the steps before train are clones of the origin's. Returns (origin id, resumed id,
    the resumed run's end data)."""
    from metaflow import Run, Runner, metadata, namespace

    sysroot = tmp_path / "metaflow"
    (sysroot / ".metaflow").mkdir(parents=True, exist_ok=True)
    env = {"METAFLOW_DATASTORE_SYSROOT_LOCAL": str(sysroot), "METAFLOW_USER": "posttrain-tests",
           "HF_HUB_OFFLINE": "1"}
    path = str(PROJECT_ROOT / "flows" / flow)
    with Runner(path, show_output=False, env=env, cwd=str(sysroot), config=[("recipe", str(recipe))]) as runner:
        failed = runner.run()
        assert failed.status == "failed", failed.stdout[-3000:] + failed.stderr[-3000:]
        assert f"injected failure {first_failure}" in failed.stdout + failed.stderr
        origin_id = failed.run.id
    with Runner(path, show_output=False, env=env, cwd=str(sysroot)) as runner:
        resumed = runner.resume(origin_run_id=origin_id)
        assert resumed.status == "successful", resumed.stdout[-4000:] + resumed.stderr[-8000:]
        run_id = resumed.run.id
    metadata(f"local@{sysroot}")
    namespace(None)
    run = Run(f"{resumed.run.pathspec}")
    assert run_id != origin_id
    assert run["train"].task.origin_pathspec is None  # the failed step ran again; the others are clones
    for step_name in ("start", "ingest", "tokenize"):
        assert (run[step_name].task.origin_pathspec or "").startswith(f"{run.parent.id}/{origin_id}/{step_name}/")
    return origin_id, run_id, run["end"].task.data


def assert_continued_and_equals_uninterrupted(data, tmp_path: Path, *, objective: str = "sft",
                                              objective_inputs: dict | None = None, num_resumes: int = 2) -> None:
    """The train log shows ``num_resumes`` resumes from step 6 (the retry's and `resume`'s), and
    the final weights equal an uninterrupted run of the same train step, bit for bit (ddp, CPU)."""
    from safetensors.torch import load_file

    from steps import launch
    from steps.config import recipe_from_dict

    log = (Path(data.run_root) / "logs" / "train-node0.log").read_text()
    assert log.count(RESUMED_FROM_6) == num_resumes, log[-4000:]
    assert [Path(c).name for c in data.checkpoints] == ["step-000006", "step-000012"]
    assert [row["step"] for row in data.train_curve] == [2, 4, 6, 8, 10, 12]

    plain = data.lineage["recipe"]
    plain = {**plain, "train": {**plain["train"], "fail_at_step": None, "kill_rank_at_step": None}}
    result = launch.run_node(recipe_from_dict(plain), data.base_model_path, data.token_stats,
                             str(tmp_path / "uninterrupted"), node_index=0, num_nodes=1, main_ip="127.0.0.1",
                             run_key=f"uninterrupted/{tmp_path}", objective=objective,
                             objective_inputs=objective_inputs)
    assert "resumed from" not in (tmp_path / "uninterrupted" / "logs" / "train-node0.log").read_text()
    expected = load_file(Path(result["checkpoints"][-1]) / "model.safetensors")
    resumed = load_file(Path(data.checkpoints[-1]) / "model.safetensors")
    assert expected.keys() == resumed.keys()
    different = [name for name in expected if not expected[name].equal(resumed[name])]
    assert not different, f"resumed weights differ from the uninterrupted run's in {different[:5]}"
    # The same losses (and objective metrics) at the same steps; throughput is wall-clock.
    timing = {"tokens_per_s", "tflops_per_device", "mfu"}
    assert ([{k: v for k, v in row.items() if k not in timing} for row in result["train_curve"]]
            == [{k: v for k, v in row.items() if k not in timing} for row in data.train_curve])


@pytest.mark.slow
def test_dpo_flow_resumes_train_from_the_origin_runs_checkpoint(tmp_path, builtin_model_dir):
    recipe = {
        "name": "dpo-resume", "seed": 0, "storage": str(tmp_path / "storage"),
        "model": {"base": str(builtin_model_dir)},
        "data": {"sources": [{"uri": "builtin:catalog-pairs"}], "builtin_num_conversations": 200,
                 "eval_fraction": 0.1},
        "tokenize": {"max_seq_tokens": 512},
        "train": {"micro_batch_tokens": 2048, "global_batch_tokens": 2048, "warmup_steps": 2, "lr": 1e-3,
                  "log_every_steps": 2, **CRASHES},
        "dpo": {"policy": "registry:no-sft-model-yet"},  # no version: starts from model.base
        "evaluate": {"num_task_prompts": 4, "max_new_tokens": 8, "generation_batch_size": 8,
                     "select_metric": "reward_accuracy"},
        "register": {"model_name": "dpo-resume"},
        "promote": {"metric": "reward_accuracy"},
    }
    path = tmp_path / "dpo.yaml"
    path.write_text(yaml.safe_dump(recipe))
    _, _, data = fail_then_resume("dpo_flow.py", path, tmp_path)
    assert_continued_and_equals_uninterrupted(data, tmp_path, objective="dpo")
    assert data.model_version == 1


@pytest.mark.slow
def test_distill_flow_resumes_train_from_the_origin_runs_checkpoint(tmp_path, builtin_model_dir):
    recipe = tiny_recipe(tmp_path, name="distill-resume", model={"base": "builtin:tiny-llama-student"},
                         train=CRASHES, distill={"teacher": str(builtin_model_dir), "temperature": 1.0},
                         register={"model_name": "distill-resume"})
    _, _, data = fail_then_resume("distill_flow.py", recipe, tmp_path)
    assert_continued_and_equals_uninterrupted(data, tmp_path, objective="distill",
                                              objective_inputs={"teacher": data.teacher_path})
    assert data.teacher_comparison["teacher"] == str(builtin_model_dir)


@pytest.mark.slow
def test_retrain_flow_retries_then_resumes_train_from_its_checkpoint(tmp_path, builtin_model_dir):
    """The scheduled flow's train step has the same @retry and resume as the others: its retry
    (the first "resumed from") and the `resume` both continue from step 6."""
    from test_retrain_flow import write_drop

    drops = tmp_path / "drops"
    write_drop(drops / "2026-01-01.jsonl", 400, seed=1)
    recipe = tiny_recipe(tmp_path, train=CRASHES, retrain={"drops": str(drops)})
    _, _, data = fail_then_resume("retrain_flow.py", recipe, tmp_path)
    assert_continued_and_equals_uninterrupted(data, tmp_path)
    assert data.new_drops == [str(drops / "2026-01-01.jsonl")] and data.model_version == 1
