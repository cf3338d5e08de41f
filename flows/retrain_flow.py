"""Scheduled production retrain: new data since the last run, warm start from the champion, gate.

    python flows/retrain_flow.py --config recipe configs/retrain_tiny.yaml run     # once, locally
    python flows/retrain_flow.py --config recipe configs/retrain_tiny.yaml argo-workflows create
    python flows/retrain_flow.py --config recipe ... --production argo-workflows create

@project keeps deployments apart: a local run uses the branch ``user.<name>``, ``--branch X``
the branch ``test.X``, ``--production`` the branch ``prod``. Each branch has its own watermark
(the drops its last successful run consumed). To start a run when new data lands instead of
(or besides) on the schedule, deploy with ``POSTTRAIN_TRIGGER_EVENT=<event name>`` set: the
flow then carries ``@trigger(event=...)`` (see infra/README.md).
"""

import os
from pathlib import Path

import yaml

import flow_env  # noqa: F401  (flows/flow_env.py: steps on sys.path, METAFLOW_USER, PATH)

from metaflow import (Config, FlowSpec, card, config_expr, current, package_sources, parallel,  # noqa: E402
                      project, schedule, step, trigger)

from card_view import show  # noqa: E402
from steps.config import recipe_from_dict  # noqa: E402

DEFAULT_RECIPE = Path(__file__).resolve().parent.parent / "configs" / "retrain_tiny.yaml"
STEPS_DIR = Path(__file__).resolve().parent.parent / "steps"


def _schedule_is(period: str):
    """A config expression: whether ``retrain.schedule`` (default ``daily``) is ``period``."""
    return config_expr(f"(recipe.get('retrain') or {{}}).get('schedule', 'daily') == '{period}'")


@package_sources(str(STEPS_DIR) if STEPS_DIR.exists() else "steps")
@project(name="posttrain")
@schedule(hourly=_schedule_is("hourly"), daily=_schedule_is("daily"), weekly=_schedule_is("weekly"))
class RetrainFlow(FlowSpec):
    """Retrain the champion on the data that arrived since the last successful retrain.

    start (watermark, warm start, eval set) -> ingest (new drops) -> tokenize -> train (@parallel)
          -> join_train -> plan_evaluation -> evaluate (foreach) -> join_evaluate -> register (gate) -> end

    The steps call the same steps/ functions as flows/sft_flow.py; only start and ingest differ.
    """

    recipe = Config("recipe", default=str(DEFAULT_RECIPE), parser=yaml.safe_load,
                    help="YAML recipe with a retrain section (see steps/config.py)")

    @property
    def spec(self):
        return recipe_from_dict(self.recipe.to_dict() if hasattr(self.recipe, "to_dict") else dict(self.recipe))

    @step
    def start(self):
        """Find the new drops (fail if none), download the champion to warm-start from, keep its eval set."""
        from steps import lineage, retrain, storage

        recipe = self.spec
        if not recipe.retrain.drops:
            raise ValueError("recipe field 'retrain.drops' must name the folder where new data arrives")
        self.run_root = storage.run_root(recipe.storage_root, current.flow_name, current.run_id)
        last = _last_successful_run(current.flow_name, current.branch_name, current.run_id)
        consumed = list(last.data.consumed_drops) if last else []
        self.new_drops = retrain.select_drops(recipe, consumed, last.pathspec if last else None)
        self.consumed_drops = sorted(set(consumed) | set(self.new_drops))  # the watermark for the next run
        self.base_model_path, self.champion = retrain.warm_start(recipe, Path(self.run_root) / "warm_start")
        self.champion_eval_split = _eval_split_of(self.champion["run"]) if self.champion else None
        self.lineage = {**lineage.collect(recipe, current.pathspec, code_dir=Path(__file__).resolve().parent),
                        "branch": current.branch_name, "drops": self.new_drops, "warm_start": self.champion}
        if self.champion:
            self.lineage["base_model"] = f"{recipe.register.model_name} v{self.champion['version']} ({recipe.promote.alias})"
        print(f"branch {current.branch_name}: {len(self.new_drops)} new drop(s) {self.new_drops}\n"
              f"warm start: {self.lineage['base_model']} -> {self.base_model_path}")
        self.next(self.ingest)

    @step
    def ingest(self):
        """Ingest the new drops only; evaluate on the champion's eval set when there is a champion."""
        from steps import ingest, retrain

        manifest = ingest.ingest(retrain.with_sources(self.spec, self.new_drops), self.run_root)
        self.dataset_manifest = retrain.keep_eval_split(manifest, self.champion_eval_split)
        self.next(self.tokenize)

    @card(type="blank")
    @step
    def tokenize(self):
        """Render chats with the model's template, mask non-assistant tokens, pack."""
        from steps import cards, chat

        self.token_stats = chat.tokenize_splits(self.spec, self.base_model_path, self.dataset_manifest,
                                                self.run_root)
        show(cards.tokenize_card(self.token_stats))
        self.next(self.train, num_parallel=self.spec.train.num_nodes)

    @card(type="blank")
    @parallel
    @step
    def train(self):
        """Launch torchrun on every node, starting from the champion's weights."""
        from steps import cards, launch

        result = launch.run_node(self.spec, self.base_model_path, self.token_stats, self.run_root,
                                node_index=current.parallel.node_index,
                                num_nodes=current.parallel.num_nodes,
                                main_ip=current.parallel.main_ip,
                                run_key=current.pathspec.rsplit("/", 1)[0])
        if current.parallel.node_index == 0:
            self.checkpoints, self.train_curve = result["checkpoints"], result["train_curve"]
            show(cards.train_card(self.train_curve))
        self.next(self.join_train)

    @step
    def join_train(self, inputs):
        """Keep what rank 0 produced."""
        self.merge_artifacts(inputs)
        self.next(self.plan_evaluation)

    @step
    def plan_evaluation(self):
        """One evaluation task per checkpoint, plus the warm-start model (the champion) as the baseline."""
        from steps import evaluate

        self.eval_targets = evaluate.eval_targets(self.spec, self.base_model_path, self.checkpoints)
        self.next(self.evaluate, foreach="eval_targets")

    @step
    def evaluate(self):
        """Score one checkpoint (or the warm-start model) on the stable eval set."""
        from steps import evaluate

        self.metrics = evaluate.evaluate_target(self.spec, self.input, self.dataset_manifest,
                                                self.token_stats, self.run_root,
                                                num_parallel_tasks=len(self.eval_targets))
        self.next(self.join_evaluate)

    @card(type="blank")
    @step
    def join_evaluate(self, inputs):
        """Collect the metrics table and pick the best checkpoint."""
        from steps import cards, evaluate

        self.merge_artifacts(inputs, exclude=["metrics"])
        self.eval_metrics = [task.metrics for task in inputs]
        self.best_checkpoint = evaluate.select_best(
            [row for row in self.eval_metrics if row["checkpoint"] != "base"],
            self.spec.evaluate.select_metric, self.spec.evaluate.select_mode)
        show(cards.evaluate_card(self.eval_metrics, self.best_checkpoint, self.champion))
        self.next(self.register)

    @card(type="blank")
    @step
    def register(self):
        """Register the best checkpoint; the registry's gate decides whether it becomes champion."""
        from steps import cards, publish

        version = publish.register_best(self.spec, self.best_checkpoint, self.eval_metrics,
                                        self.lineage, self.dataset_manifest, self.run_root)
        self.model_name, self.model_version, self.model_uri = version.name, version.version, version.uri
        self.promotion = publish.promote(self.spec, version, current.pathspec)
        show(cards.register_card(self.model_name, self.model_version, self.model_uri, self.eval_metrics,
                                 self.best_checkpoint, self.promotion, self.champion))
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
