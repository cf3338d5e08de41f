"""The step bodies every flow shares: one place for each policy, so that flows cannot drift apart.

A flow file keeps its graph, its decorators and its ``self.*`` assignments; a shared step's body
calls one function here and keeps what it returns (see the ``train`` step of any flow).

The policies that live here, and nowhere else:

- **Retry and resume.** Every ``train`` step is ``@flow_steps.train_step`` (``@parallel``,
  ``@retry(**TRAIN_RETRY)``, the train card). A retried or resumed
  (``resume --origin-run-id``) train step continues from the latest complete checkpoint of this
  run, of the origin run, and of ``train.resume_from``; it never starts again from step 0.
- **Cards.** ``tokenize``, ``train``, ``join_evaluate`` and ``register`` show the same cards in
  every flow (``steps/cards.py`` draws them; ``card_view.show`` turns them into components).
- **Evaluation rows.** The starting model's row is ``steps.contracts.BASELINE_ROW``; the best
  checkpoint is chosen among trained checkpoints only, by ``evaluate.select_metric``.

Functions here may import metaflow (``current``); the logic they call, in ``steps/``, never does.
"""

from __future__ import annotations

from pathlib import Path

from metaflow import Config, StepMutator, current
from metaflow.exception import MetaflowException

from card_view import show

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"
_STEPS_DIR = Path(__file__).resolve().parent.parent / "steps"
STEPS_SOURCE = str(_STEPS_DIR) if _STEPS_DIR.exists() else "steps"
"""What ``@package_sources`` adds to every flow's code package: ``steps/`` (on remote compute the
package is all there is)."""

TRAIN_RETRY = {"times": 1, "minutes_between_retries": 0}
"""``@retry`` of every train step: a lost node or rank retries once, from the latest checkpoint."""


class train_step(StepMutator):  # noqa: N801  (named as the decorator it is: ``@flow_steps.train_step``)
    """Every flow's train step policy, as one decorator: ``@parallel``, ``@retry(**TRAIN_RETRY)``
    and the train card (``@card(type="blank")``)::

        @flow_steps.train_step
        @step
        def train(self):
            trained = flow_steps.train(self.spec, self.base_model_path, self.token_stats, self.run_root)

    The step body calls :func:`train`, which resumes from the latest checkpoint on a retry.
    """

    def pre_mutate(self, mutable_step):
        mutable_step.add_decorator("parallel")
        mutable_step.add_decorator("retry", deco_kwargs=TRAIN_RETRY)
        mutable_step.add_decorator("card", deco_kwargs={"type": "blank"})

UNATTENDED_RETRY = {"times": 2, "minutes_between_retries": 1}
"""``@retry`` of the idempotent steps of a scheduled flow (nobody is there to ``resume`` it):
steps that only read their inputs and rewrite their own files under the run root."""


def recipe_config(default_recipe: str) -> Config:
    """The flow's ``recipe`` Config: a YAML file, ``configs/<default_recipe>`` unless
    ``--config recipe FILE`` names another (see steps/config.py for every field). It is checked
    when the flow loads it, before any task starts (:func:`parse_recipe`)."""
    return Config("recipe", default=str(CONFIGS_DIR / default_recipe), parser=parse_recipe,
                  help="YAML recipe (see steps/config.py and docs/recipes.md for every field)")


def parse_recipe(text: str) -> dict:
    """Every flow's Config parser: the recipe's YAML, parsed safely (YAML 1.2 floats, no
    duplicate keys, bounded aliases and nesting) and validated in full, local source paths
    included. A bad recipe stops the flow before any task starts, with every problem on its own
    line and no traceback::

        recipe configs/my.yaml has 3 problems:
          recipe has unknown field 'trian' (known: data, distill, dpo, evaluate, ...)
          recipe field 'train.lr' must be > 0, got -1.0
          recipe field 'data.sources[0].uri' names no file or folder: 'data/typo.jsonl' (...)
    """
    from steps.config import RecipeError, missing_local_sources, parse_recipe_yaml, recipe_problems

    try:
        data = parse_recipe_yaml(text)
        problems = recipe_problems(data) + missing_local_sources(data)
    except RecipeError as err:
        problems = err.problems
    if problems:
        raise BadRecipe(problems)
    return data or {}


class BadRecipe(MetaflowException):
    """A recipe with problems: Metaflow prints the message (every problem) without a traceback."""

    headline = "Bad recipe"

    def __init__(self, problems: list[str]):
        count = f"{len(problems)} problem{'s' if len(problems) > 1 else ''}"
        super().__init__(f"the recipe has {count}:\n" + "\n".join(f"  {line}" for line in problems))


def recipe_of(flow):
    """The flow's recipe as validated dataclasses (``spec = property(flow_steps.recipe_of)``)."""
    from steps.config import recipe_from_dict

    return recipe_from_dict(flow.recipe.to_dict() if hasattr(flow.recipe, "to_dict") else dict(flow.recipe))


def run_root(spec) -> str:
    """This run's folder under the recipe's storage: ``<storage>/<Flow>/<run_id>``."""
    from steps import storage

    return storage.run_root(spec.storage_root, current.flow_name, current.run_id)


def lineage(spec, **extra) -> dict:
    """What produced this run (``steps.lineage.collect``), with the flow's own ``extra`` keys."""
    from steps import lineage as lineage_

    return {**lineage_.collect(spec, current.pathspec, code_dir=Path(__file__).resolve().parent), **extra}


def base_model(spec, run_root_: str) -> tuple[str, dict | None]:
    """``model.base`` as a local folder, and the registry version it came from (None unless it is
    ``registry:...``): ``steps.models.resolve_model_ref``, the one resolver of model references."""
    from steps import models

    return models.resolve_model_ref(spec.model.base, spec, Path(run_root_) / "base_model", field="model.base")


def tokenize(spec, base_model_path: str, dataset_manifest: dict, run_root_: str) -> dict:
    """Render, mask and pack the conversations (``steps.chat``); show the tokenize card."""
    from steps import cards, chat

    token_stats = chat.tokenize_splits(spec, base_model_path, dataset_manifest, run_root_)
    show(cards.tokenize_card(token_stats))
    return token_stats


def origin_run_root(spec) -> str | None:
    """On ``resume``, the run root of the run being resumed (its checkpoints count too)."""
    from steps import storage

    if not current.origin_run_id:
        return None
    return storage.run_root(spec.storage_root, current.flow_name, current.origin_run_id)


def train(spec, base_model_path: str, token_stats: dict, run_root_: str, *, objective: str = "sft",
          objective_inputs: dict | None = None) -> tuple[list[str], list[dict]] | None:
    """This node's share of a ``@parallel`` train step: torchrun over ``train.nproc_per_node`` ranks.

    Every node looks for checkpoints in the same places (this run, the origin run of a
    ``resume``, ``train.resume_from``) and uses the same rendezvous port for an attempt; a retry
    gets a new port, so a half-dead previous attempt cannot join it. Node 0 returns
    ``(checkpoints, train_curve)`` and shows the train card; the other nodes return None (their
    artifacts would only conflict in ``join_train``).
    """
    from steps import cards, launch

    result = launch.run_node(spec, base_model_path, token_stats, run_root_,
                             node_index=current.parallel.node_index, num_nodes=current.parallel.num_nodes,
                             main_ip=current.parallel.main_ip,
                             run_key=f"{current.pathspec.rsplit('/', 1)[0]}/{current.retry_count}",
                             resume_roots=launch.resume_roots_for(spec, origin_run_root(spec)),
                             objective=objective, objective_inputs=objective_inputs)
    if current.parallel.node_index != 0:
        return None
    show(cards.train_card(result["train_curve"]))
    return result["checkpoints"], result["train_curve"]


def evaluate(flow, heldout=None) -> dict:
    """Score the foreach's target (``flow.input``) on the run's held-out data: the held-out loss (or
    ``heldout``, a method's own held-out metrics), then task metrics by generation. One row.

    Reads the artifacts every flow has by then: ``spec``, ``dataset_manifest``, ``token_stats``,
    ``run_root`` and ``eval_targets`` (the foreach's width: its tasks share the machine's cores).
    """
    from steps import evaluate as evaluate_

    kwargs = {"heldout": heldout} if heldout is not None else {}
    return evaluate_.evaluate_target(flow.spec, flow.input, flow.dataset_manifest, flow.token_stats, flow.run_root,
                                     num_parallel_tasks=len(flow.eval_targets), **kwargs)


def champion_metrics(spec) -> dict | None:
    """``{"version", "metrics"}`` of the registry's champion (``promote.alias``), None if there is none."""
    from steps import cards

    return cards.registry_version_metrics(spec.registry_root, spec.register.model_name, spec.promote.alias)


def join_evaluate(spec, rows: list[dict], champion: dict | None, extra_metrics: tuple[str, ...] = ()) -> dict:
    """The best trained checkpoint of the metrics ``rows`` (by ``evaluate.select_metric``); shows
    the evaluation card, with the champion's row when there is one, and the method's own
    ``extra_metrics`` after the common ones."""
    from steps import cards, contracts, evaluate as evaluate_

    best = evaluate_.select_best(contracts.scored_checkpoints(rows), spec.evaluate.select_metric,
                                 spec.evaluate.select_mode)
    show(cards.evaluate_card(rows, best, champion, extra_metrics))
    return best


def register(spec, best: dict, eval_metrics: list[dict], lineage_: dict, dataset_manifest: dict,
             run_root_: str, champion: dict | None = None, extra_metrics: tuple[str, ...] = ()
             ) -> tuple[str, int, str, dict]:
    """Publish ``best`` as the next registry version and let the gate move the champion alias.

    Returns ``(model_name, model_version, model_uri, promotion)`` and shows the register card
    (against ``champion``, else the champion the gate leaves in place).
    """
    from steps import cards, publish

    version = publish.register_best(spec, best, eval_metrics, lineage_, dataset_manifest, run_root_)
    promotion = publish.promote(spec, version, current.pathspec)
    if champion is None:  # the champion the gate compared with (None on a first registration)
        champion = cards.registry_version_metrics(spec.registry_root, version.name, promotion["champion_version"])
    show(cards.register_card(version.name, version.version, version.uri, eval_metrics, best, promotion, champion,
                             extra_metrics))
    return version.name, version.version, version.uri, promotion
