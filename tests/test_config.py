"""Recipe parsing: defaults, every shipped YAML, and errors that name the field."""

from pathlib import Path

import pytest

from steps.config import Recipe, RecipeError, load_recipe, recipe_from_dict, recipe_to_dict

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))


def test_empty_recipe_is_the_embedded_default():
    recipe = recipe_from_dict({})
    assert recipe.model.base == "builtin:tiny-llama"
    assert [s.uri for s in recipe.data.sources] == ["builtin:catalog"]
    assert recipe.train.num_nodes == 1 and recipe.train.strategy == "ddp"


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads(path):
    assert isinstance(load_recipe(path), Recipe)


def test_default_yaml_matches_the_dataclass_defaults_where_it_is_silent():
    recipe = load_recipe(Path(__file__).resolve().parent.parent / "configs" / "sft_tiny.yaml")
    assert recipe.train.max_steps == 400 and recipe.train.lr == 2e-3
    assert recipe.train.betas == (0.9, 0.95)


def test_round_trip_through_plain_data():
    recipe = recipe_from_dict({"train": {"max_steps": 7, "betas": [0.8, 0.9]}, "seed": 3})
    again = recipe_from_dict(recipe_to_dict(recipe))
    assert again == recipe
    assert recipe_to_dict(recipe)["train"]["betas"] == [0.8, 0.9]


@pytest.mark.parametrize("data, message", [
    ({"trian": {}}, "recipe has unknown field 'trian'"),
    ({"train": {"lrr": 1}}, "recipe has unknown field 'train.lrr'"),
    ({"data": {"sources": [{"uri": "a.jsonl", "wieght": 2}]}}, "unknown field 'data.sources[0].wieght'"),
    ({"train": {"lr": -1}}, "recipe field 'train.lr' must be > 0, got -1.0"),
    ({"train": {"max_steps": "ten"}}, "recipe field 'train.max_steps' must be an integer, got 'ten'"),
    ({"train": {"max_steps": True}}, "recipe field 'train.max_steps' must be an integer, got True"),
    ({"train": {"strategy": "horovod"}}, "recipe field 'train.strategy' must be one of ['ddp', 'fsdp2', 'deepspeed_zero2', 'deepspeed_zero3']"),
    ({"tokenize": {"truncation": "middle"}}, "recipe field 'tokenize.truncation' must be one of"),
    ({"train": {"micro_batch_tokens": 1000}},
     "recipe field 'train.micro_batch_tokens' must be a multiple of tokenize.max_seq_tokens (256), got 1000"),
    ({"train": {"global_batch_tokens": 6144}},
     "recipe field 'train.global_batch_tokens' must be a multiple of train.micro_batch_tokens (4096)"),
    ({"data": {"eval_fraction": 1.5}}, "recipe field 'data.eval_fraction' must be in (0, 1), got 1.5"),
    ({"data": {"sources": []}}, "recipe field 'data.sources' must be a non-empty list"),
    ({"data": {"sources": [{"weight": 1}]}}, "recipe section 'data.sources[0]'"),
    ({"model": "tiny"}, "recipe field 'model' must be a mapping"),
    ({"evaluate": {"select_mode": "best"}}, "recipe field 'evaluate.select_mode' must be one of ['max', 'min']"),
    ({"promote": {"min_delta": -0.1}}, "recipe field 'promote.min_delta' must be >= 0, got -0.1"),
    ({"dpo": {"rejected": "sampled"}}, "recipe field 'dpo.rejected' must be one of ['dataset', 'on_policy']"),
    ({"dpo": {"rejected": "on_policy", "on_policy_samples": -1}},
     "recipe field 'dpo.on_policy_samples' must be >= 0, got -1"),
    ({"dpo": {"rejected": "on_policy", "on_policy_temperature": 0}}, "recipe field 'dpo.on_policy_temperature' must be > 0"),
])
def test_bad_recipes_fail_with_the_field_named(data, message):
    with pytest.raises(RecipeError) as err:
        recipe_from_dict(data)
    assert message in str(err.value)


def test_recipe_error_is_a_value_error():
    assert issubclass(RecipeError, ValueError)


def test_storage_root_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("POSTTRAIN_STORAGE", str(tmp_path / "env"))
    assert recipe_from_dict({}).storage_root == str(tmp_path / "env")
    assert recipe_from_dict({"storage": str(tmp_path / "own")}).storage_root == str(tmp_path / "own")
    assert recipe_from_dict({"storage": str(tmp_path)}).registry_root == str(tmp_path / "registry")


def test_on_policy_settings_without_on_policy_rejected_answers_warn():
    with pytest.warns(UserWarning, match=r"'dpo.on_policy_\*' is ignored: they apply to rejected 'on_policy' only"):
        recipe_from_dict({"dpo": {"on_policy_samples": 2}})
