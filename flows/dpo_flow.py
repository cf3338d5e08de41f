"""Direct preference optimisation of the latest registered SFT model, to a registered model.

    python flows/dpo_flow.py run                                   # the embedded default recipe
    python flows/dpo_flow.py --config recipe configs/my.yaml run   # another recipe
"""

from pathlib import Path

import yaml

import flow_env  # noqa: F401  (flows/flow_env.py: steps on sys.path, METAFLOW_USER, PATH)

from metaflow import Config, FlowSpec, card, current, package_sources, parallel, retry, step  # noqa: E402

from card_view import show  # noqa: E402
from steps.config import recipe_from_dict  # noqa: E402

DEFAULT_RECIPE = Path(__file__).resolve().parent.parent / "configs" / "dpo_tiny.yaml"
STEPS_DIR = Path(__file__).resolve().parent.parent / "steps"


@package_sources(str(STEPS_DIR) if STEPS_DIR.exists() else "steps")
class DPOFlow(FlowSpec):
    """Train a policy to prefer the chosen over the rejected answer of preference pairs (DPO).

    start (policy = latest SFT version, reference) -> ingest (pairs)
          -> on_policy (dpo.rejected: on_policy: the policy's own failing answers become the rejected ones)
          -> tokenize (+ reference log-probs)
          -> train (@parallel, objective "dpo") -> join_train -> plan_evaluation
          -> evaluate (foreach: held-out pairs + task metrics) -> join_evaluate -> register -> end

    The steps call the same steps/ functions as flows/sft_flow.py; what is DPO's own is in steps/dpo.py.
    """

    recipe = Config("recipe", default=str(DEFAULT_RECIPE), parser=yaml.safe_load,
                    help="YAML recipe with a dpo section (see steps/config.py)")

    @property
    def spec(self):
        return recipe_from_dict(self.recipe.to_dict() if hasattr(self.recipe, "to_dict") else dict(self.recipe))

    @step
    def start(self):
        """Fetch the starting policy (the latest registered SFT model, else model.base) and the reference."""
        from steps import dpo, lineage, storage

        self.run_root = storage.run_root(self.spec.storage_root, current.flow_name, current.run_id)
        models = dpo.starting_models(self.spec, self.run_root)
        self.base_model_path, self.reference_path, self.parent = (models["policy_path"], models["reference_path"],
                                                                  models["parent"])
        self.lineage = {**lineage.collect(self.spec, current.pathspec, code_dir=Path(__file__).resolve().parent),
                        "base_model": self.spec.dpo.policy if self.parent else self.spec.model.base,
                        "parent": self.parent, "reference": self.spec.dpo.reference}
        print(f"run root: {self.run_root}\npolicy: {self.spec.dpo.policy} -> {self.base_model_path} "
              f"(parent {self.parent})\nreference: {self.reference_path}")
        self.next(self.ingest)

    @step
    def ingest(self):
        """Read, validate, dedupe and split the preference pairs into Parquet shards."""
        from steps import dpo, ingest

        self.dataset_manifest = ingest.ingest(self.spec, self.run_root, record_format=dpo.PAIRS)
        self.next(self.on_policy)

    @step
    def on_policy(self):
        """With dpo.rejected 'on_policy': the starting policy answers the training prompts, and an answer
        the evaluators score below the chosen one becomes the pair's rejected answer. Else nothing."""
        from steps import dpo

        if self.spec.dpo.rejected == "on_policy":
            self.dataset_manifest = dpo.on_policy_rejected(self.spec, self.base_model_path, self.dataset_manifest,
                                                           self.run_root)
        self.next(self.tokenize)

    @step
    def tokenize(self):
        """Render prompt+chosen and prompt+rejected, pack each pair in one row, add reference log-probs."""
        from steps import dpo

        self.token_stats = dpo.tokenize_splits(self.spec, self.base_model_path, self.reference_path,
                                               self.dataset_manifest, self.run_root)
        self.next(self.train, num_parallel=self.spec.train.num_nodes)

    # A retry (and a `resume`) continues from the latest complete checkpoint, not from step 0.
    @card(type="blank")
    @retry(times=1, minutes_between_retries=0)
    @parallel
    @step
    def train(self):
        """Launch torchrun on every node with the dpo objective; rank 0 writes checkpoints."""
        from steps import cards, launch

        result = launch.run_node(self.spec, self.base_model_path, self.token_stats, self.run_root,
                                node_index=current.parallel.node_index,
                                num_nodes=current.parallel.num_nodes,
                                main_ip=current.parallel.main_ip,
                                run_key=f"{current.pathspec.rsplit('/', 1)[0]}/{current.retry_count}",
                                resume_roots=launch.resume_roots_for(self.spec), objective="dpo")
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
        """One evaluation task per checkpoint, plus the starting policy as the baseline."""
        from steps import evaluate

        self.eval_targets = evaluate.eval_targets(self.spec, self.base_model_path, self.checkpoints)
        self.next(self.evaluate, foreach="eval_targets")

    @step
    def evaluate(self):
        """Held-out pairs (reward accuracy, margin, log-probs) and the task metrics of one checkpoint."""
        from steps import dpo

        self.metrics = dpo.evaluate_target(self.spec, self.input, self.dataset_manifest, self.token_stats,
                                           self.run_root, num_parallel_tasks=len(self.eval_targets))
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
        show(cards.evaluate_card(self.eval_metrics, self.best_checkpoint, cards.registry_version_metrics(
            self.spec.registry_root, self.spec.register.model_name, self.spec.promote.alias)))
        self.next(self.register)

    @step
    def register(self):
        """Publish the best checkpoint under the recipe's model name; lineage names the parent version."""
        from steps import publish

        version = publish.register_best(self.spec, self.best_checkpoint, self.eval_metrics,
                                        self.lineage, self.dataset_manifest, self.run_root)
        self.model_name, self.model_version, self.model_uri = version.name, version.version, version.uri
        self.promotion = publish.promote(self.spec, version, current.pathspec)
        self.next(self.end)

    @step
    def end(self):
        """Say where the model is and how it compares with the starting policy."""
        from steps import dpo

        print(dpo.summary(self.spec, self.model_name, self.model_version, self.model_uri,
                          self.eval_metrics, self.best_checkpoint, self.promotion))


if __name__ == "__main__":
    DPOFlow()
