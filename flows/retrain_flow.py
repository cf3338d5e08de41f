"""Scheduled production retrain: new data since the last run, warm start from the champion, gate.

    python flows/retrain_flow.py --config recipe configs/retrain_tiny.yaml run     # once, locally
    python flows/retrain_flow.py --config recipe configs/retrain_tiny.yaml argo-workflows create
    python flows/retrain_flow.py --config recipe ... --production argo-workflows create

@project keeps deployments apart: a local run uses the branch ``user.<name>``, ``--branch X``
the branch ``test.X``, ``--production`` the branch ``prod``. Each branch has its own watermark
(the drops its last successful run consumed). To start a run when new data lands instead of
(or besides) on the schedule, deploy with ``POSTTRAIN_TRIGGER_EVENT=<event name>`` set: the
flow then carries ``@trigger(event=...)`` (see infra/README.md). How to feed it new data
("drops"): docs/production.md.
"""

import os
from pathlib import Path

import flow_env  # noqa: F401  (flows/flow_env.py: steps on sys.path, METAFLOW_USER, PATH)

from metaflow import (FlowSpec, card, config_expr, current, package_sources, project, retry, schedule,  # noqa: E402
                      step, trigger)

import flow_steps  # noqa: E402  (flows/flow_steps.py: the step bodies every flow shares)


def _schedule_is(period: str):
    """A config expression: whether ``retrain.schedule`` (default ``daily``) is ``period``."""
    return config_expr(f"(recipe.get('retrain') or {{}}).get('schedule', 'daily') == '{period}'")


@package_sources(flow_steps.STEPS_SOURCE)
@project(name="posttrain")
@schedule(hourly=_schedule_is("hourly"), daily=_schedule_is("daily"), weekly=_schedule_is("weekly"))
class RetrainFlow(FlowSpec):
    """Retrain the champion on the data that arrived since the last successful retrain.

    start (watermark, warm start, eval set) -> ingest (new drops) -> tokenize -> train (@parallel)
          -> join_train -> plan_evaluation -> evaluate (foreach) -> join_evaluate -> register (gate) -> end

    The steps call the same steps/ functions as flows/sft_flow.py; only start and ingest differ.
    """

    recipe = flow_steps.recipe_config("retrain_tiny.yaml")
    spec = property(flow_steps.recipe_of)

    @step
    def start(self):
        """Find the new drops (fail if none), download the champion to warm-start from, keep its eval set."""
        from steps import retrain

        recipe = self.spec
        if not recipe.retrain.drops:
            raise ValueError("recipe field 'retrain.drops' must name the folder where new data arrives")
        self.run_root = flow_steps.run_root(recipe)
        last = _last_successful_run(current.flow_name, current.branch_name, current.run_id)
        consumed = list(last.data.consumed_drops) if last else []
        self.new_drops = retrain.select_drops(recipe, consumed, last.pathspec if last else None)
        self.consumed_drops = sorted(set(consumed) | set(self.new_drops))  # the watermark for the next run
        self.base_model_path, self.champion = retrain.warm_start(recipe, Path(self.run_root) / "warm_start")
        self.champion_eval_split = _eval_split_of(self.champion["run"]) if self.champion else None
        self.lineage = flow_steps.lineage(recipe, branch=current.branch_name, drops=self.new_drops,
                                          warm_start=self.champion)
        if self.champion:
            self.lineage["base_model"] = f"{recipe.register.model_name} v{self.champion['version']} ({recipe.promote.alias})"
        print(f"branch {current.branch_name}: {len(self.new_drops)} new drop(s) {self.new_drops}\n"
              f"warm start: {self.lineage['base_model']} -> {self.base_model_path}")
        self.next(self.ingest)

    @retry(**flow_steps.UNATTENDED_RETRY)
    @step
    def ingest(self):
        """Ingest the new drops only; evaluate on the champion's eval set when there is a champion."""
        from steps import ingest, retrain

        manifest = ingest.ingest(retrain.with_sources(self.spec, self.new_drops), self.run_root)
        self.dataset_manifest = retrain.keep_eval_split(manifest, self.champion_eval_split)
        self.next(self.tokenize)

    # Nobody watches a scheduled run: every step that only reads its inputs and rewrites its own
    # files retries a transient failure (a lost pod, an S3 hiccup) instead of failing the night's
    # retrain. Not start (it reads the watermark once) and not register (a version is immutable).
    @card(type="blank")
    @retry(**flow_steps.UNATTENDED_RETRY)
    @step
    def tokenize(self):
        """Render the new drops' chats with the champion's own chat template (its tokenizer came with
        the warm-start download), mask non-assistant tokens, pack."""
        self.token_stats = flow_steps.tokenize(self.spec, self.base_model_path, self.dataset_manifest, self.run_root)
        self.next(self.train, num_parallel=self.spec.train.num_nodes)

    @flow_steps.train_step  # @parallel, @retry (resumes from the latest checkpoint), the train card
    @step
    def train(self):
        """Launch torchrun on every node, starting from the champion's weights (warm start: a fresh
        optimizer and schedule; a retry or a resume continues from this run's own checkpoints)."""
        trained = flow_steps.train(self.spec, self.base_model_path, self.token_stats, self.run_root)
        if trained:  # node 0 reports for every node
            self.checkpoints, self.train_curve = trained
        self.next(self.join_train)

    @retry(**flow_steps.UNATTENDED_RETRY)
    @step
    def join_train(self, inputs):
        """Keep what rank 0 produced."""
        self.merge_artifacts(inputs)
        self.next(self.plan_evaluation)

    @retry(**flow_steps.UNATTENDED_RETRY)
    @step
    def plan_evaluation(self):
        """One evaluation task per checkpoint, plus the warm-start model (the champion) as the baseline."""
        from steps import evaluate

        self.eval_targets = evaluate.eval_targets(self.spec, self.base_model_path, self.checkpoints)
        self.next(self.evaluate, foreach="eval_targets")

    @retry(**flow_steps.UNATTENDED_RETRY)
    @step
    def evaluate(self):
        """Score one checkpoint (or the warm-start model) on the stable eval set."""
        self.metrics = flow_steps.evaluate(self)
        self.next(self.join_evaluate)

    @card(type="blank")
    @retry(**flow_steps.UNATTENDED_RETRY)
    @step
    def join_evaluate(self, inputs):
        """Collect the metrics table and pick the best checkpoint, next to the champion it must beat
        (the gate in register compares the two on the champion's eval set)."""
        self.merge_artifacts(inputs, exclude=["metrics"])
        self.eval_metrics = [task.metrics for task in inputs]
        self.best_checkpoint = flow_steps.join_evaluate(self.spec, self.eval_metrics, self.champion)
        self.next(self.register)

    @card(type="blank")
    @step
    def register(self):
        """Register the best checkpoint; the registry's gate decides whether it becomes champion."""
        self.model_name, self.model_version, self.model_uri, self.promotion = flow_steps.register(
            self.spec, self.best_checkpoint, self.eval_metrics, self.lineage, self.dataset_manifest, self.run_root,
            self.champion)  # the card compares with the champion it had to beat
        self.next(self.end)

    @step
    def end(self):
        """Say what was trained on, what was registered, and the gate's decision."""
        from steps import publish

        print(f"trained on {self.new_drops}")
        print(publish.summary(self.spec, self.model_name, self.model_version, self.model_uri,
                              self.eval_metrics, self.best_checkpoint, self.promotion))


def _last_successful_run(flow_name: str, branch: str, this_run_id: str):
    """The newest successful run of this flow on this @project branch (not this run), or None."""
    from metaflow import Flow, namespace
    from metaflow.exception import MetaflowNotFound

    namespace(None)
    try:
        runs = Flow(flow_name).runs(f"project_branch:{branch}")
    except MetaflowNotFound:
        return None
    return next((run for run in runs if run.id != this_run_id and run.successful), None)


def _eval_split_of(run_pathspec: str) -> dict:
    """The eval split (URIs, count, fingerprint) of the run that produced a registered model."""
    from metaflow import Run, namespace

    namespace(None)
    return Run(run_pathspec)["end"].task.data.dataset_manifest["splits"]["eval"]


if os.environ.get("POSTTRAIN_TRIGGER_EVENT"):
    # Event-triggered deployments: read when `argo-workflows create` imports this file.
    RetrainFlow = trigger(event=os.environ["POSTTRAIN_TRIGGER_EVENT"])(RetrainFlow)

if __name__ == "__main__":
    RetrainFlow()
