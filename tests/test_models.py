"""The one resolver of model references: builtin, folder, Hub id and registry:NAME[@version|@alias]."""

from pathlib import Path

import pytest

from steps import dpo, retrain
from steps.config import recipe_from_dict
from steps.models import ModelNotFound, resolve_model_ref
from steps.registry import NotFoundError, Registry


def _recipe(tmp_path: Path, base: str):
    return recipe_from_dict({"storage": str(tmp_path / "storage"), "model": {"base": base},
                             "register": {"registry_root": str(tmp_path / "registry")}})


def test_plain_references_resolve_as_model_base_does(tmp_path, builtin_model_dir):
    recipe = _recipe(tmp_path, str(builtin_model_dir))
    assert resolve_model_ref(str(builtin_model_dir), recipe, tmp_path / "unused") == (str(builtin_model_dir), None)
    assert resolve_model_ref("org/some-hub-model", recipe, tmp_path / "unused") == ("org/some-hub-model", None)
    assert not (tmp_path / "unused").exists()


def test_registry_references_download_the_version_and_name_it(tmp_path, builtin_model_dir):
    recipe = _recipe(tmp_path, str(builtin_model_dir))
    registry = Registry(recipe.registry_root)
    for run in ("SFTFlow/1", "SFTFlow/2"):
        registry.register("sft", builtin_model_dir, {"run": run, "metrics": {"task_score": 0.5}})
    registry.set_alias("sft", "champion", 1)

    for ref, version in (("registry:sft", 2), ("registry:sft@1", 1), ("registry:sft@champion", 1)):
        path, found = resolve_model_ref(ref, recipe, tmp_path / ref.replace(":", "_"))
        assert found == {"name": "sft", "version": version, "run": f"SFTFlow/{version}",
                         "uri": registry.get("sft", version).uri, "metrics": {"task_score": 0.5}}
        assert (Path(path) / "model.safetensors").read_bytes() == (builtin_model_dir / "model.safetensors").read_bytes()


@pytest.mark.parametrize("ref, field", [("registry:sft@7", "dpo.reference"), ("registry:sft@staging", "dpo.policy"),
                                        ("registry:other", "distill.teacher"), ("registry:other@champion", "model.base")])
def test_a_missing_registry_model_is_one_clear_error_naming_the_field(tmp_path, builtin_model_dir, ref, field):
    recipe = _recipe(tmp_path, str(builtin_model_dir))
    Registry(recipe.registry_root).register("sft", builtin_model_dir, {"run": "SFTFlow/1"})
    with pytest.raises(ModelNotFound, match=rf"^{field}='{ref}': ") as error:
        resolve_model_ref(ref, recipe, tmp_path / "dest", field=field)
    assert isinstance(error.value, NotFoundError)  # callers that catch the registry's error still do
    assert not (tmp_path / "dest").exists()


def test_fall_back_to_base_only_while_the_model_has_no_version_and_never_for_a_pinned_number(tmp_path,
                                                                                          builtin_model_dir):
    recipe = _recipe(tmp_path, str(builtin_model_dir))
    for ref in ("registry:sft", "registry:sft@champion"):
        assert resolve_model_ref(ref, recipe, tmp_path / "d", fall_back_to_base=True) == (str(builtin_model_dir), None)
    with pytest.raises(ModelNotFound):
        resolve_model_ref("registry:sft@3", recipe, tmp_path / "d", fall_back_to_base=True)
    Registry(recipe.registry_root).register("sft", builtin_model_dir, {"run": "SFTFlow/1"})
    # Versions exist but the alias points nowhere: an error, not a silent start from model.base.
    with pytest.raises(ModelNotFound, match="champion"):
        resolve_model_ref("registry:sft@champion", recipe, tmp_path / "d", fall_back_to_base=True)


def test_dpo_and_the_retrain_start_through_the_same_resolver(tmp_path, builtin_model_dir):
    recipe = recipe_from_dict({"storage": str(tmp_path / "storage"), "model": {"base": str(builtin_model_dir)},
                               "register": {"registry_root": str(tmp_path / "registry"), "model_name": "sft"},
                               "dpo": {"policy": "registry:sft", "reference": "registry:sft@5"}})
    with pytest.raises(ModelNotFound, match=r"^dpo.reference='registry:sft@5': "):
        dpo.starting_models(recipe, str(tmp_path / "run"))
    assert retrain.warm_start(recipe, tmp_path / "warm") == (str(builtin_model_dir), None)
    registry = Registry(recipe.registry_root)
    registry.register("sft", builtin_model_dir, {"run": "RetrainFlow/1", "metrics": {"task_score": 0.25}})
    registry.set_alias("sft", "champion", 1)
    path, champion = retrain.warm_start(recipe, tmp_path / "warm")
    assert champion == {"version": 1, "run": "RetrainFlow/1", "metrics": {"task_score": 0.25}}
    assert path == str(tmp_path / "warm")
