"""Supervised fine-tuning, from raw conversations to a registered model.

    python flows/sft_flow.py run                                   # the embedded default recipe
    python flows/sft_flow.py --config recipe configs/my.yaml run   # another recipe
"""

from pathlib import Path

import yaml

import flow_env  # noqa: F401  (flows/flow_env.py: steps on sys.path, METAFLOW_USER, PATH)

from metaflow import Config, FlowSpec, card, current, package_sources, parallel, retry, step  # noqa: E402

from card_view import show  # noqa: E402  (flows/card_view.py: steps.cards blocks -> card components)
from steps.config import recipe_from_dict  # noqa: E402

# Step modules (torch, transformers) are imported inside each step: the flow file itself stays
# light, so `metaflow.Runner` and the CLI load it fast and without importing torch.

DEFAULT_RECIPE = Path(__file__).resolve().parent.parent / "configs" / "sft_tiny.yaml"
STEPS_DIR = Path(__file__).resolve().parent.parent / "steps"


@package_sources(str(STEPS_DIR) if STEPS_DIR.exists() else "steps")
class SFTFlow(FlowSpec):
    """Fine-tune a causal LM on chat data and publish the best checkpoint.

    start -> ingest -> tokenize -> train (@parallel, torchrun) -> join_train -> plan_evaluation
          -> evaluate (foreach checkpoint + baseline) -> join_evaluate -> register -> end
    """

    recipe = Config("recipe", default=str(DEFAULT_RECIPE), parser=yaml.safe_load,
                    help="YAML recipe (see steps/config.py for every field)")

    @property
    def spec(self):
        """The recipe as validated dataclasses."""
        return recipe_from_dict(self.recipe.to_dict() if hasattr(self.recipe, "to_dict") else dict(self.recipe))

    @step
    def start(self):
        """Validate the recipe, record lineage, build the base model if it is builtin."""
        from steps import lineage, storage

        recipe = self.spec
        self.run_root = storage.run_root(recipe.storage_root, current.flow_name, current.run_id)
        self.base_model_path = str(lineage.resolve_base_model(recipe))
        self.lineage = lineage.collect(recipe, current.pathspec, code_dir=Path(__file__).resolve().parent)
        print(f"run root: {self.run_root}\nbase model: {recipe.model.base} -> {self.base_model_path}")
        self.next(self.ingest)

    @step
    def ingest(self):
        """Read, validate, dedupe and split the conversations into Parquet shards."""
        from steps import ingest

        self.dataset_manifest = ingest.ingest(self.spec, self.run_root)
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

    # A retry (and a `resume`) continues from the latest complete checkpoint, not from step 0.
    @card(type="blank")
    @retry(times=1, minutes_between_retries=0)
    @parallel
    @step
    def train(self):
        """Launch torchrun on every node; rank 0 writes checkpoints under the run root."""
        from steps import cards, launch

        result = launch.run_node(self.spec, self.base_model_path, self.token_stats, self.run_root,
                                node_index=current.parallel.node_index,
                                num_nodes=current.parallel.num_nodes,
                                main_ip=current.parallel.main_ip,
                                run_key=f"{current.pathspec.rsplit('/', 1)[0]}/{current.retry_count}",
                                resume_roots=launch.resume_roots_for(self.spec, self._origin_run_root()))
        if current.parallel.node_index == 0:
            self.checkpoints, self.train_curve = result["checkpoints"], result["train_curve"]
            show(cards.train_card(self.train_curve))
        self.next(self.join_train)

    def _origin_run_root(self):
        """On ``resume``, the run root of the run being resumed (its checkpoints count too)."""
        from steps import storage

        if not current.origin_run_id:
            return None
        return storage.run_root(self.spec.storage_root, current.flow_name, current.origin_run_id)

    @step
    def join_train(self, inputs):
        """Keep what rank 0 produced (the other nodes add no artifacts of their own)."""
        self.merge_artifacts(inputs)
        self.next(self.plan_evaluation)

    @step
    def plan_evaluation(self):
        """One evaluation task per checkpoint, plus the base model as the baseline."""
        from steps import evaluate

        self.eval_targets = evaluate.eval_targets(self.spec, self.base_model_path, self.checkpoints)
        self.next(self.evaluate, foreach="eval_targets")

    @step
    def evaluate(self):
        """Score one checkpoint (or the base model) on held-out data."""
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
        show(cards.evaluate_card(self.eval_metrics, self.best_checkpoint, cards.registry_version_metrics(
            self.spec.registry_root, self.spec.register.model_name, self.spec.promote.alias)))
        self.next(self.register)

    @card(type="blank")
    @step
    def register(self):
        """Publish the best checkpoint to the model registry with lineage and metrics."""
        from steps import cards, publish

        version = publish.register_best(self.spec, self.best_checkpoint, self.eval_metrics,
                                        self.lineage, self.dataset_manifest, self.run_root)
        self.model_name, self.model_version, self.model_uri = version.name, version.version, version.uri
        self.promotion = publish.promote(self.spec, version, current.pathspec)
        show(cards.register_card(self.model_name, self.model_version, self.model_uri, self.eval_metrics,
                                 self.best_checkpoint, self.promotion, cards.registry_version_metrics(
                                     self.spec.registry_root, self.model_name, self.promotion["champion_version"])))
        self.next(self.end)

    @step
    def end(self):
        """Say where the model is and how it compares with the base model."""
        from steps import publish

        print(publish.summary(self.spec, self.model_name, self.model_version, self.model_uri,
                              self.eval_metrics, self.best_checkpoint, self.promotion))


if __name__ == "__main__":
    SFTFlow()
