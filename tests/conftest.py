"""Shared test set-up: offline Hugging Face, a Metaflow user, the builtin model built once."""

import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.setdefault("METAFLOW_USER", "posttrain-tests")

# metaflow.Runner imports metaflow's vendored (old) typing_extensions, which replaces
# typing._collect_parameters for the whole process with a version that rejects TypeVar defaults;
# torch modules imported after that fail ("Type parameter ~_T1 without a default follows type
# parameter with a default"). Import it once here and put the standard function back.
import typing  # noqa: E402

_collect_parameters = getattr(typing, "_collect_parameters", None)
import metaflow._vendor.typing_extensions  # noqa: E402,F401

if _collect_parameters is not None:
    typing._collect_parameters = _collect_parameters

PROJECT_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def builtin_model_dir(tmp_path_factory) -> Path:
    """The builtin tiny Llama (model + tokenizer), built once per test session."""
    from steps.builtin import ensure_builtin_model

    return ensure_builtin_model("tiny-llama", tmp_path_factory.mktemp("builtin-cache"))


@pytest.fixture()
def metaflow_env(tmp_path, monkeypatch) -> Path:
    """A private Metaflow datastore for one test (the Client reads the same one)."""
    sysroot = tmp_path / "metaflow"
    sysroot.mkdir()
    monkeypatch.setenv("METAFLOW_DATASTORE_SYSROOT_LOCAL", str(sysroot))
    monkeypatch.setenv("METAFLOW_USER", "posttrain-tests")
    return sysroot
