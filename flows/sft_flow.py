"""Supervised fine-tuning, from raw conversations to a registered model.

    python flows/sft_flow.py run                                   # the embedded default recipe
    python flows/sft_flow.py --config recipe configs/my.yaml run   # another recipe
"""

import flow_env  # noqa: F401  (flows/flow_env.py: steps on sys.path, METAFLOW_USER, PATH)

from metaflow import FlowSpec, card, package_sources, step  # noqa: E402

import flow_steps  # noqa: E402  (flows/flow_steps.py: the step bodies every flow shares)

# Step modules (torch, transformers) are imported inside each step: the flow file itself stays
# light, so `metaflow.Runner` and the CLI load it fast and without importing torch.


@package_sources(flow_steps.STEPS_SOURCE)
class SFTFlow(FlowSpec):
    """Fine-tune a causal LM on chat data and publish the best checkpoint.

    start -> ingest -> tokenize -> train (@parallel, torchrun) -> join_train -> plan_evaluation
          -> evaluate (foreach checkpoint + baseline) -> join_evaluate -> register -> end
    """

    recipe = flow_steps.recipe_config("sft_tiny.yaml")
    spec = property(flow_steps.recipe_of)

    @step
    def start(self):
        """Validate the recipe, record lineage, build the base model if it is builtin."""
        self.run_root = flow_steps.run_root(self.spec)
        self.base_model_path, parent = flow_steps.base_model(self.spec, self.run_root)
        self.lineage = flow_steps.lineage(self.spec, **({"parent": parent} if parent else {}))
        print(f"run root: {self.run_root}\nbase model: {self.spec.model.base} -> {self.base_model_path}")
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
        self.token_stats = flow_steps.tokenize(self.spec, self.base_model_path, self.dataset_manifest, self.run_root)
        self.next(self.train, num_parallel=self.spec.train.num_nodes)

    @flow_steps.train_step  # @parallel, @retry (resumes from the latest checkpoint), the train card
    @step
    def train(self):
        """Launch torchrun on every node; rank 0 writes checkpoints under the run root."""
        trained = flow_steps.train(self.spec, self.base_model_path, self.token_stats, self.run_root)
        if trained:  # node 0 reports for every node
            self.checkpoints, self.train_curve = trained
        self.next(self.join_train)

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
        self.metrics = flow_steps.evaluate(self)
        self.next(self.join_evaluate)

    @card(type="blank")
    @step
    def join_evaluate(self, inputs):
        """Collect the metrics table and pick the best checkpoint."""
        self.merge_artifacts(inputs, exclude=["metrics"])
        self.eval_metrics = [task.metrics for task in inputs]
        self.best_checkpoint = flow_steps.join_evaluate(self.spec, self.eval_metrics,
                                                        flow_steps.champion_metrics(self.spec))
        self.next(self.register)

    @card(type="blank")
    @step
    def register(self):
        """Publish the best checkpoint to the model registry with lineage and metrics."""
        self.model_name, self.model_version, self.model_uri, self.promotion = flow_steps.register(
            self.spec, self.best_checkpoint, self.eval_metrics, self.lineage, self.dataset_manifest, self.run_root)
        self.next(self.end)

    @step
    def end(self):
        """Say where the model is and how it compares with the base model."""
        from steps import publish

        print(publish.summary(self.spec, self.model_name, self.model_version, self.model_uri,
                              self.eval_metrics, self.best_checkpoint, self.promotion))


if __name__ == "__main__":
    SFTFlow()
