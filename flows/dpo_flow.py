"""Direct preference optimisation of the latest registered SFT model, to a registered model.

    python flows/dpo_flow.py run                                   # the embedded default recipe
    python flows/dpo_flow.py --config recipe configs/my.yaml run   # another recipe
"""

import flow_env  # noqa: F401  (flows/flow_env.py: steps on sys.path, METAFLOW_USER, PATH)

from metaflow import FlowSpec, card, package_sources, step  # noqa: E402

import flow_steps  # noqa: E402  (flows/flow_steps.py: the step bodies every flow shares)


@package_sources(flow_steps.STEPS_SOURCE)
class DPOFlow(FlowSpec):
    """Train a policy to prefer the chosen over the rejected answer of preference pairs (DPO).

    start (policy = latest SFT version, reference) -> ingest (pairs)
          -> on_policy (dpo.rejected: on_policy: the policy's own failing answers become the rejected ones)
          -> tokenize (+ reference log-probs)
          -> train (@parallel, objective "dpo") -> join_train -> plan_evaluation
          -> evaluate (foreach: held-out pairs + task metrics) -> join_evaluate -> register -> end

    The steps call the same steps/ functions as flows/sft_flow.py; what is DPO's own is in steps/dpo.py.
    """

    recipe = flow_steps.recipe_config("dpo_tiny.yaml")
    spec = property(flow_steps.recipe_of)

    @step
    def start(self):
        """Fetch the starting policy (the latest registered SFT model, else model.base) and the reference."""
        from steps import dpo

        self.run_root = flow_steps.run_root(self.spec)
        models = dpo.starting_models(self.spec, self.run_root)
        self.base_model_path, self.reference_path, self.parent = (models["policy_path"], models["reference_path"],
                                                                  models["parent"])
        self.lineage = flow_steps.lineage(self.spec, parent=self.parent, reference=self.spec.dpo.reference,
                                          base_model=self.spec.dpo.policy if self.parent else self.spec.model.base)
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

    @card(type="blank")
    @step
    def tokenize(self):
        """Render prompt+chosen and prompt+rejected, pack each pair in one row, add reference log-probs."""
        from steps import cards, dpo

        self.token_stats = dpo.tokenize_splits(self.spec, self.base_model_path, self.reference_path,
                                               self.dataset_manifest, self.run_root)
        flow_steps.show(cards.tokenize_card(self.token_stats))
        self.next(self.train, num_parallel=self.spec.train.num_nodes)

    @flow_steps.train_step  # @parallel, @retry (resumes from the latest checkpoint), the train card
    @step
    def train(self):
        """Launch torchrun on every node with the dpo objective; rank 0 writes checkpoints."""
        trained = flow_steps.train(self.spec, self.base_model_path, self.token_stats, self.run_root,
                                   objective="dpo")
        if trained:  # node 0 reports for every node
            self.checkpoints, self.train_curve = trained
        self.next(self.join_train)

    @step
    def join_train(self, inputs):
        """Keep what rank 0 produced: the checkpoints, and the curve with the DPO metrics of every
        logged step (chosen and rejected log-probs, reward accuracy and margin)."""
        self.merge_artifacts(inputs)
        self.next(self.plan_evaluation)

    @step
    def plan_evaluation(self):
        """One evaluation task per checkpoint, plus the starting policy as the baseline (its held-out
        reward accuracy is 0 when it is its own reference: every reward is 0)."""
        from steps import evaluate

        self.eval_targets = evaluate.eval_targets(self.spec, self.base_model_path, self.checkpoints)
        self.next(self.evaluate, foreach="eval_targets")

    @step
    def evaluate(self):
        """Held-out pairs (reward accuracy, margin, log-probs) and the task metrics of one checkpoint."""
        from steps import dpo

        self.metrics = flow_steps.evaluate(self, dpo.heldout_metrics(self.spec))
        self.next(self.join_evaluate)

    @card(type="blank")
    @step
    def join_evaluate(self, inputs):
        """Collect the metrics table (task metrics, then the held-out preference metrics) and pick the
        best checkpoint by evaluate.select_metric."""
        from steps import dpo

        self.merge_artifacts(inputs, exclude=["metrics"])
        self.eval_metrics = [task.metrics for task in inputs]
        self.best_checkpoint = flow_steps.join_evaluate(self.spec, self.eval_metrics,
                                                        flow_steps.champion_metrics(self.spec), dpo.PREFERENCE_METRICS)
        self.next(self.register)

    @card(type="blank")
    @step
    def register(self):
        """Publish the best checkpoint under the recipe's model name (not the SFT model's); its lineage
        names the parent version it started from."""
        from steps import dpo

        self.model_name, self.model_version, self.model_uri, self.promotion = flow_steps.register(
            self.spec, self.best_checkpoint, self.eval_metrics, self.lineage, self.dataset_manifest, self.run_root,
            extra_metrics=dpo.PREFERENCE_METRICS)
        self.next(self.end)

    @step
    def end(self):
        """Say where the model is and how it compares with the starting policy."""
        from steps import dpo, publish

        print(publish.summary(self.spec, self.model_name, self.model_version, self.model_uri,
                              self.eval_metrics, self.best_checkpoint, self.promotion, dpo.PREFERENCE_METRICS))


if __name__ == "__main__":
    DPOFlow()
