"""Knowledge distillation: a smaller student learns a registered model's next-token distribution.

    python flows/distill_flow.py run                                   # configs/distill_tiny.yaml
    python flows/distill_flow.py --config recipe configs/my.yaml run   # another recipe

The default teacher is the latest registered ``catalog-assistant`` (run flows/sft_flow.py
first); the student is ``builtin:tiny-llama-student``. See steps/distill.py for the loss.
"""

from pathlib import Path

import yaml

import flow_env  # noqa: F401  (flows/flow_env.py: steps on sys.path, METAFLOW_USER, PATH)

from metaflow import Config, FlowSpec, card, current, package_sources, parallel, retry, step  # noqa: E402

from card_view import show  # noqa: E402
from steps.config import recipe_from_dict  # noqa: E402

DEFAULT_RECIPE = Path(__file__).resolve().parent.parent / "configs" / "distill_tiny.yaml"
STEPS_DIR = Path(__file__).resolve().parent.parent / "steps"


@package_sources(str(STEPS_DIR) if STEPS_DIR.exists() else "steps")
class DistillFlow(FlowSpec):
    """Distil a teacher into the recipe's (smaller) base model and publish the student.

    start (teacher, tokenizer check) -> ingest -> tokenize -> teacher_logits (top-k pass, if asked)
          -> train (@parallel, objective "distill") -> join_train -> plan_evaluation
          -> evaluate (foreach checkpoint + student base + teacher) -> join_evaluate -> register -> end

    The steps call the same steps/ functions as flows/sft_flow.py; start, teacher_logits and
    the teacher's row in the evaluation are what distillation adds.
    """

    recipe = Config("recipe", default=str(DEFAULT_RECIPE), parser=yaml.safe_load,
                    help="YAML recipe with a distill section (see steps/config.py)")

    @property
    def spec(self):
        return recipe_from_dict(self.recipe.to_dict() if hasattr(self.recipe, "to_dict") else dict(self.recipe))

    @step
    def start(self):
        """Find the teacher (the latest registered SFT model by default), check it shares the student's tokenizer."""
        from steps import distill, lineage, storage

        recipe = self.spec
        self.run_root = storage.run_root(recipe.storage_root, current.flow_name, current.run_id)
        self.base_model_path = str(lineage.resolve_base_model(recipe))
        self.teacher_path, self.teacher = distill.resolve_teacher(recipe, Path(self.run_root) / "teacher")
        distill.check_same_tokenizer(self.teacher_path, self.base_model_path, recipe.model.trust_remote_code)
        self.lineage = {**lineage.collect(recipe, current.pathspec, code_dir=Path(__file__).resolve().parent),
                        "teacher": self.teacher}
        print(f"run root: {self.run_root}\nstudent: {recipe.model.base} -> {self.base_model_path}\n"
              f"teacher: {recipe.distill.teacher} -> {self.teacher_path}")
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
        """Render chats with the (shared) template, mask non-assistant tokens, pack."""
        from steps import cards, chat

        self.token_stats = chat.tokenize_splits(self.spec, self.base_model_path, self.dataset_manifest,
                                                self.run_root)
        show(cards.tokenize_card(self.token_stats))
        self.next(self.teacher_logits)

    @step
    def teacher_logits(self):
        """With distill.teacher_logits: top_k, store the teacher's top-k log-probs next to the token shards."""
        from steps import distill

        self.token_stats = distill.precompute_teacher_top_k(self.spec, self.teacher_path, self.base_model_path,
                                                            self.token_stats, self.run_root)
        self.next(self.train, num_parallel=self.spec.train.num_nodes)

    @card(type="blank")
    @retry(times=1, minutes_between_retries=0)
    @parallel
    @step
    def train(self):
        """Launch torchrun on every node; the loss is the KL to the teacher on trained tokens."""
        from steps import cards, launch

        result = launch.run_node(self.spec, self.base_model_path, self.token_stats, self.run_root,
                                node_index=current.parallel.node_index,
                                num_nodes=current.parallel.num_nodes,
                                main_ip=current.parallel.main_ip,
                                run_key=f"{current.pathspec.rsplit('/', 1)[0]}/{current.retry_count}",
                                resume_roots=launch.resume_roots_for(self.spec, self._origin_run_root()),
                                objective="distill", objective_inputs={"teacher": self.teacher_path})
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
        """Keep what rank 0 produced."""
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
        """Score one checkpoint (or the base model, or the teacher) on held-out data."""
        from steps import evaluate

        self.metrics = evaluate.evaluate_target(self.spec, self.input, self.dataset_manifest,
                                                self.token_stats, self.run_root,
                                                num_parallel_tasks=len(self.eval_targets))
        self.next(self.join_evaluate)

    @card(type="blank")
    @step
    def join_evaluate(self, inputs):
        """Pick the best student checkpoint and compare it with the teacher."""
        from steps import cards, distill, evaluate

        self.merge_artifacts(inputs, exclude=["metrics"])
        self.eval_metrics, self.teacher_metrics = distill.split_teacher_row([task.metrics for task in inputs])
        self.best_checkpoint = evaluate.select_best(
            [row for row in self.eval_metrics if row["checkpoint"] != "base"],
            self.spec.evaluate.select_metric, self.spec.evaluate.select_mode)
        self.teacher_comparison = distill.teacher_comparison(self.teacher_metrics, self.best_checkpoint,
                                                             self.teacher)
        show(cards.evaluate_card(self.eval_metrics, self.best_checkpoint, cards.registry_version_metrics(
            self.spec.registry_root, self.spec.register.model_name, self.spec.promote.alias)))
        show([{"markdown": f"## Student vs teacher\n```\n{distill.comparison_text(self.teacher_comparison)}\n```"}])
        self.next(self.register)

    @card(type="blank")
    @step
    def register(self):
        """Publish the best student checkpoint under its own name, with the teacher in its lineage."""
        from steps import cards, publish

        version = publish.register_best(self.spec, self.best_checkpoint, self.eval_metrics,
                                        {**self.lineage, "teacher_comparison": self.teacher_comparison},
                                        self.dataset_manifest, self.run_root)
        self.model_name, self.model_version, self.model_uri = version.name, version.version, version.uri
        self.promotion = publish.promote(self.spec, version, current.pathspec)
        show(cards.register_card(self.model_name, self.model_version, self.model_uri, self.eval_metrics,
                                 self.best_checkpoint, self.promotion, cards.registry_version_metrics(
                                     self.spec.registry_root, self.model_name, self.promotion["champion_version"])))
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
