"""Knowledge distillation: a smaller student learns a registered model's next-token distribution.

    python flows/distill_flow.py run                                   # configs/distill_tiny.yaml
    python flows/distill_flow.py --config recipe configs/my.yaml run   # another recipe

The default teacher is the latest registered ``catalog-assistant`` (run flows/sft_flow.py
first); the student is ``builtin:tiny-llama-student``. See steps/distill.py for the loss.
"""

from pathlib import Path

import flow_env  # noqa: F401  (flows/flow_env.py: steps on sys.path, METAFLOW_USER, PATH)

from metaflow import FlowSpec, card, package_sources, step  # noqa: E402

import flow_steps  # noqa: E402  (flows/flow_steps.py: the step bodies every flow shares)


@package_sources(flow_steps.STEPS_SOURCE)
class DistillFlow(FlowSpec):
    """Distil a teacher into the recipe's (smaller) base model and publish the student.

    start (teacher, tokenizer check) -> ingest -> tokenize -> teacher_logits (top-k pass, if asked)
          -> train (@parallel, objective "distill") -> join_train -> plan_evaluation
          -> evaluate (foreach checkpoint + student base + teacher) -> join_evaluate -> register -> end

    The steps call the same steps/ functions as flows/sft_flow.py; start, teacher_logits and
    the teacher's row in the evaluation are what distillation adds.
    """

    recipe = flow_steps.recipe_config("distill_tiny.yaml")
    spec = property(flow_steps.recipe_of)

    @step
    def start(self):
        """Find the teacher (the latest registered SFT model by default) first, since a missing one is the
        likely failure, then build the student; check that both tokenize alike."""
        from steps import distill

        self.run_root = flow_steps.run_root(self.spec)
        self.teacher_path, self.teacher = distill.resolve_teacher(self.spec, Path(self.run_root) / "teacher")
        self.base_model_path, parent = flow_steps.base_model(self.spec, self.run_root)
        distill.check_same_tokenizer(self.teacher_path, self.base_model_path, self.spec.model.trust_remote_code)
        self.lineage = flow_steps.lineage(self.spec, teacher=self.teacher, **({"parent": parent} if parent else {}))
        print(f"run root: {self.run_root}\nstudent: {self.spec.model.base} -> {self.base_model_path}\n"
              f"teacher: {self.spec.distill.teacher} -> {self.teacher_path}")
        self.next(self.ingest)

    @step
    def ingest(self):
        """Read, validate, dedupe and split the conversations into Parquet shards: the text on which
        the student matches the teacher's next-token distribution."""
        from steps import ingest

        self.dataset_manifest = ingest.ingest(self.spec, self.run_root)
        self.next(self.tokenize)

    @card(type="blank")
    @step
    def tokenize(self):
        """Render chats with the template that student and teacher share (start checked it), mask
        non-assistant tokens, pack."""
        self.token_stats = flow_steps.tokenize(self.spec, self.base_model_path, self.dataset_manifest, self.run_root)
        self.next(self.teacher_logits)

    @step
    def teacher_logits(self):
        """With distill.teacher_logits: top_k, store the teacher's top-k log-probs next to the token shards."""
        from steps import distill

        self.token_stats = distill.precompute_teacher_top_k(self.spec, self.teacher_path, self.base_model_path,
                                                            self.token_stats, self.run_root)
        self.next(self.train, num_parallel=self.spec.train.num_nodes)

    @flow_steps.train_step  # @parallel, @retry (resumes from the latest checkpoint), the train card
    @step
    def train(self):
        """Launch torchrun on every node; the loss is the KL to the teacher on trained tokens."""
        trained = flow_steps.train(self.spec, self.base_model_path, self.token_stats, self.run_root,
                                   objective="distill", objective_inputs={"teacher": self.teacher_path})
        if trained:  # node 0 reports for every node
            self.checkpoints, self.train_curve = trained
        self.next(self.join_train)

    @step
    def join_train(self, inputs):
        """Keep what rank 0 produced: the checkpoints, and the curve with the cross-entropy and the KL
        to the teacher at every logged step."""
        self.merge_artifacts(inputs)
        self.next(self.plan_evaluation)

    @step
    def plan_evaluation(self):
        """One evaluation task per checkpoint, plus the student's base model and the teacher."""
        from steps import distill

        self.eval_targets = distill.eval_targets(self.spec, self.base_model_path, self.teacher_path,
                                                 self.checkpoints)
        self.next(self.evaluate, foreach="eval_targets")

    @step
    def evaluate(self):
        """Score one checkpoint, the student's base model or the teacher on held-out data (the
        teacher's row is compared with the student's, never registered)."""
        self.metrics = flow_steps.evaluate(self)
        self.next(self.join_evaluate)

    @card(type="blank")
    @step
    def join_evaluate(self, inputs):
        """Pick the best student checkpoint and compare it with the teacher, metric by metric, on the
        same held-out requests."""
        from steps import distill

        self.merge_artifacts(inputs, exclude=["metrics"])
        self.eval_metrics, self.teacher_metrics = distill.split_teacher_row([task.metrics for task in inputs])
        self.best_checkpoint = flow_steps.join_evaluate(self.spec, self.eval_metrics,
                                                        flow_steps.champion_metrics(self.spec))
        self.teacher_comparison = distill.teacher_comparison(self.teacher_metrics, self.best_checkpoint,
                                                             self.teacher)
        flow_steps.show([{"markdown": f"## Student vs teacher\n```\n"
                                      f"{distill.comparison_text(self.teacher_comparison)}\n```"}])
        self.next(self.register)

    @card(type="blank")
    @step
    def register(self):
        """Publish the best student checkpoint under its own name, with the teacher in its lineage."""
        self.model_name, self.model_version, self.model_uri, self.promotion = flow_steps.register(
            self.spec, self.best_checkpoint, self.eval_metrics, {**self.lineage, "teacher_comparison":
                                                                 self.teacher_comparison},
            self.dataset_manifest, self.run_root)
        self.next(self.end)

    @step
    def end(self):
        """Say where the student is, and how it compares with its base model and its teacher."""
        from steps import distill, publish

        print(publish.summary(self.spec, self.model_name, self.model_version, self.model_uri,
                              self.eval_metrics, self.best_checkpoint, self.promotion))
        print(distill.comparison_text(self.teacher_comparison))


if __name__ == "__main__":
    DistillFlow()
