"""Resume as a user does it: the train step fails, `resume --origin-run-id` finishes the run.

    python flows/sft_flow.py --config recipe my.yaml run            # train fails (twice: @retry)
    python flows/sft_flow.py resume --origin-run-id <run id>        # the origin run's recipe
"""

from pathlib import Path

import pytest

from test_flow import FLOW, tiny_recipe


@pytest.mark.slow
def test_resume_clones_finished_steps_and_continues_training_from_its_checkpoint(tmp_path, builtin_model_dir):
    from metaflow import Run, Runner, metadata, namespace

    sysroot = tmp_path / "metaflow"
    (sysroot / ".metaflow").mkdir(parents=True)
    # 12 steps with checkpoints at 6 and 12. The train step has @retry(times=1), so it takes two
    # crashes to fail the run: an exception after step 4 (first attempt, before any checkpoint),
    # then a SIGKILL after step 9 (the retry, which saved step 6). Each injection fires once.
    recipe = tiny_recipe(tmp_path, train={"fail_at_step": 4, "kill_rank_at_step": 9})
    env = {"METAFLOW_DATASTORE_SYSROOT_LOCAL": str(sysroot), "METAFLOW_USER": "posttrain-tests",
           "HF_HUB_OFFLINE": "1"}
    runner_args = dict(show_output=False, env=env, cwd=str(sysroot))

    with Runner(str(FLOW), config=[("recipe", str(recipe))], **runner_args) as runner:
        failed = runner.run()
        assert failed.status == "failed", failed.stdout[-3000:]
        origin_id = failed.run.id
        assert "injected failure after step 4" in failed.stderr + failed.stdout

    # No --config on resume: Metaflow takes the origin run's recipe (and refuses a new one).
    with Runner(str(FLOW), **runner_args) as runner:
        resumed = runner.resume(origin_run_id=origin_id)
        assert resumed.status == "successful", resumed.stdout[-4000:] + resumed.stderr[-8000:]
        run_id = resumed.run.id

    metadata(f"local@{sysroot}")
    namespace(None)
    run = Run(f"SFTFlow/{run_id}")
    assert run_id != origin_id
    # The finished steps are clones of the origin run's tasks, not re-executions.
    for step_name in ("start", "ingest", "tokenize"):
        assert (run[step_name].task.origin_pathspec or "").startswith(f"SFTFlow/{origin_id}/{step_name}/")
    assert run["train"].task.origin_pathspec is None  # the failed step ran again

    data = run["end"].task.data
    # Training continued from the origin run's step-6 checkpoint, not from step 0. The run root is
    # the origin's (start is cloned), so the resumed step finds that checkpoint there.
    train_log = (Path(data.run_root) / "logs" / "train-node0.log").read_text()
    assert "resumed from" in train_log and "step-000006 at step 6" in train_log, train_log[-3000:]
    assert [Path(c).name for c in data.checkpoints] == ["step-000006", "step-000012"]
    # The curve is step-6's rows and then the resumed steps' rows, on the log_every_steps
    # schedule: the same rows as an uninterrupted run (the first step of a session is printed,
    # not added to the curve).
    assert [row["step"] for row in data.train_curve] == [2, 4, 6, 8, 10, 12]
    assert data.model_version == 1 and data.promotion["promoted"] is True
    # And its weights are those of the same training without the crashes, bit for bit.
    from test_resume_flows import assert_continued_and_equals_uninterrupted

    assert_continued_and_equals_uninterrupted(data, tmp_path, num_resumes=1)
