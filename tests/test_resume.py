"""Resume as a user does it: the train step fails, `resume --origin-run-id` finishes the run.

    python flows/sft_flow.py --config recipe my.yaml run            # train fails (twice: @retry)
    python flows/sft_flow.py resume --origin-run-id <run id>        # the origin run's recipe
"""

import pytest

from test_flow import tiny_recipe


@pytest.mark.slow
def test_resume_clones_finished_steps_and_continues_training_from_its_checkpoint(tmp_path, builtin_model_dir):
    from test_resume_flows import assert_continued_and_equals_uninterrupted, fail_then_resume

    # 12 steps with checkpoints at 6 and 12. The train step has @retry(times=1), so it takes two
    # crashes to fail the run: an exception after step 4 (first attempt, before any checkpoint),
    # then a SIGKILL after step 9 (the retry, which saved step 6). Each injection fires once.
    recipe = tiny_recipe(tmp_path, train={"fail_at_step": 4, "kill_rank_at_step": 9})
    _, _, data = fail_then_resume("sft_flow.py", recipe, tmp_path, first_failure="after step 4")

    # Training continued from the origin run's step-6 checkpoint, not from step 0 (the retry had
    # no checkpoint to resume from). The run root is the origin's (start is cloned), so the resumed
    # step finds that checkpoint there. The curve is step-6's rows and then the resumed steps'
    # rows, on the log_every_steps schedule: the same rows as an uninterrupted run (the first step
    # of a session is printed, not added to the curve). And its weights are those of the same
    # training without the crashes, bit for bit.
    assert_continued_and_equals_uninterrupted(data, tmp_path, num_resumes=1)
    assert data.model_version == 1 and data.promotion["promoted"] is True
