"""The worked examples in the docstrings of steps/ (STYLE rule 6) are run, so they stay true."""

import doctest
import importlib
import os
from pathlib import Path

import pytest

STEPS = Path(__file__).resolve().parent.parent / "steps"
MODULES = sorted("steps." + str(p.relative_to(STEPS).with_suffix("")).replace(os.sep, ".")
                 for p in STEPS.rglob("*.py") if p.name != "__init__.py")


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_hold(name, monkeypatch):
    # DeepSpeed (imported by transformers when it saves a model) announces on stdout that it falls
    # back to the CPU unless told; that line would be read as an example's output.
    monkeypatch.setenv("DS_ACCELERATOR", os.environ.get("DS_ACCELERATOR", "cpu"))
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0, f"{result.failed} of {result.attempted} docstring examples of {name} failed"
