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


# ---------------------------------------------------------------------------------------------
# Hostile and clumsy recipes: read safely, every problem at once, short messages
# ---------------------------------------------------------------------------------------------

from steps.config import missing_local_sources, parse_recipe_yaml, recipe_problems  # noqa: E402

_LAUGHS = "".join(f"{name}: &{name} [{', '.join([f'*{prev}'] * 9) if prev else ', '.join(['lol'] * 9)}]\n"
                  for prev, name in zip([None, *"abcdefgh"], "abcdefghi"))


@pytest.mark.parametrize("text", [
    _LAUGHS,  # billion laughs: 9 levels of 9 lists
    "base: &b {x: 1}\n" + "".join(f"k{i}: {{<<: *b}}\n" for i in range(80)),  # merge keys, many aliases
    "a: " + "[" * 200 + "]" * 200 + "\n",  # deep nesting
    "a: " + "{b: " * 60 + "1" + "}" * 60 + "\n",
], ids=["billion-laughs", "many-merge-aliases", "deep-lists", "deep-mappings"])
def test_alias_bombs_and_deep_nesting_are_refused_at_once_with_a_short_message(text):
    import time

    started = time.monotonic()
    with pytest.raises(RecipeError) as error:
        parse_recipe_yaml(text)
    assert time.monotonic() - started < 2
    assert len(str(error.value)) < 200 and ("aliases" in str(error.value) or "nests deeper" in str(error.value))


@pytest.mark.parametrize("text, key", [
    ("seed: 1\nseed: 2\n", "'seed'"),
    ("train:\n  lr: 1.0\n  max_steps: 3\n  lr: 2.0\n", "'lr'"),
    ("data:\n  sources:\n    - {uri: a.jsonl, uri: b.jsonl}\n", "'uri'"),
])
def test_duplicate_keys_are_an_error_naming_the_key(text, key):
    with pytest.raises(RecipeError, match=f"recipe has the key {key} twice in one mapping"):
        parse_recipe_yaml(text)


@pytest.mark.parametrize("written, value", [("1e-3", 1e-3), ("3E-4", 3e-4), ("1.5e+2", 150.0), ("-2e-5", -2e-5),
                                            ("2.", 2.0), (".5", 0.5), ("1_000.5", 1000.5)])
def test_floats_as_users_write_them_are_numbers(written, value):
    assert parse_recipe_yaml(f"x: {written}\n") == {"x": value}
    assert load_recipe_text(f"train:\n  lr: {written.lstrip('-')}\n").train.lr == abs(value)


def load_recipe_text(text: str) -> Recipe:
    return recipe_from_dict(parse_recipe_yaml(text))


def test_integers_strings_and_booleans_keep_their_types():
    assert parse_recipe_yaml("a: 100\nb: 1e3x\nc: true\nd: '1e-3'\n") == {"a": 100, "b": "1e3x", "c": True,
                                                                        "d": "1e-3"}


@pytest.mark.parametrize("data, message", [
    ({"data": {"sources": [{"uri": "builtin:catalog", "weight": float("inf")}]}},
     "'data.sources[0].weight' must be a finite number, got inf"),
    ({"data": {"sources": [{"uri": "builtin:catalog", "weight": float("nan")}]}}, "must be a finite number, got nan"),
    ({"data": {"sources": [{"uri": "builtin:catalog", "weight": 1e9}]}}, "'data.sources[0].weight' must be in (0, 100"),
    ({"train": {"lr": 10 ** 400}}, "'train.lr' must be a finite number"),
    ({"train": {"max_steps": 10 ** 30}}, "'train.max_steps' must be an integer of at most"),
    ({"data": {"builtin_num_conversations": 10 ** 9}}, "'data.builtin_num_conversations' must be at most"),
])
def test_numbers_must_be_finite_and_within_sane_bounds(data, message):
    with pytest.raises(RecipeError) as error:
        recipe_from_dict(data)
    assert message in str(error.value)


def test_every_problem_is_reported_at_once_one_line_each_with_its_field():
    data = {"trian": {}, "train": {"lr": -1, "warmup_steps": "ten"}, "evaluate": {"num_task_prompts": 0},
            "data": {"sources": [{"uri": "no/such/file.jsonl"}, {"uri": "builtin:catalog", "weight": -2}]}}
    problems = recipe_problems(data) + missing_local_sources(data)
    assert len(problems) == 6, problems
    for field in ("'trian'", "'train.lr'", "'train.warmup_steps'", "'evaluate.num_task_prompts'",
                  "'data.sources[1].weight'", "'data.sources[0].uri' names no file or folder"):
        assert sum(field in line for line in problems) == 1, (field, problems)
    with pytest.raises(RecipeError) as error:
        recipe_from_dict(data)
    assert error.value.problems == problems[:5] and str(error.value).count("\n") == 4


def test_messages_never_hold_a_huge_value():
    with pytest.raises(RecipeError) as error:
        recipe_from_dict({"train": {"lr": "x" * 1_000_000}, "seed": list(range(100_000))})
    assert all(len(line) < 200 for line in error.value.problems), [len(line) for line in error.value.problems]
    assert "chars)" in str(error.value)


@pytest.mark.slow
def test_a_bad_recipe_stops_the_flow_before_any_task_with_every_problem_and_no_traceback(tmp_path):
    import subprocess
    import sys

    recipe = tmp_path / "bad.yaml"
    recipe.write_text("trian: {}\ntrain:\n  lr: -1e-3\ndata:\n  sources: [{uri: data/typo.jsonl}]\n")
    env = {"METAFLOW_USER": "posttrain-tests", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin",
           "METAFLOW_DATASTORE_SYSROOT_LOCAL": str(tmp_path)}
    for flow in ("sft_flow.py", "dpo_flow.py", "distill_flow.py", "retrain_flow.py"):
        out = subprocess.run([sys.executable, str(CONFIGS[0].parent.parent / "flows" / flow), "--config", "recipe",
                              str(recipe), "run"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        text = out.stdout + out.stderr
        assert out.returncode != 0, text
        assert "Traceback" not in text and "Workflow starting" not in text, text
        assert "the recipe has 3 problems:" in text, text
        for line in ("recipe has unknown field 'trian'", "recipe field 'train.lr' must be > 0, got -0.001",
                     "recipe field 'data.sources[0].uri' names no file or folder: 'data/typo.jsonl'"):
            assert line in text, text


def test_run_storage_on_s3_is_refused_instead_of_becoming_a_local_folder_named_s3(monkeypatch):
    with pytest.raises(RecipeError, match="recipe field 'storage' must be a local folder every node mounts"):
        recipe_from_dict({"storage": "s3://bucket/runs"})
    monkeypatch.setenv("POSTTRAIN_STORAGE", "s3://bucket/runs")
    with pytest.raises(RecipeError, match=r"run storage on s3:// is not supported yet \('s3://bucket/runs'\)"):
        recipe_from_dict({}).storage_root
