"""The notebooks run top to bottom against a real run, and are committed without outputs."""

import os
import re

import nbformat
import pytest

from conftest import PROJECT_ROOT

NOTEBOOKS = PROJECT_ROOT / "notebooks"


@pytest.mark.parametrize("name", ["inspect_run", "compare_runs"])
def test_notebook_is_committed_without_outputs(name):
    notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code and all(not cell.outputs and cell.execution_count is None for cell in code)


def execute(name: str, env: dict) -> nbformat.NotebookNode:
    """Run every cell in a fresh ``python3`` kernel (ipykernel of this interpreter); raise on a cell error."""
    from nbclient import NotebookClient

    notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)  # the kernel inherits this process's environment
    try:
        NotebookClient(notebook, kernel_name="python3", timeout=300,
                       resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return notebook


def outputs_of(notebook) -> tuple[str, int]:
    """All text output of the notebook, and how many PNG images it displayed."""
    texts, num_png = [], 0
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            texts.append(output.get("text", ""))
            texts += [str(v) for k, v in output.get("data", {}).items() if k.startswith("text/")]
            num_png += "image/png" in output.get("data", {})
    return "\n".join(texts), num_png


# Markdown syntax that only means something when rendered: a heading at the start of a line, or a
# bold span. In printed text (a stream, or an object's text/plain) it shows up raw: `## Promotion`.
RAW_MARKDOWN = re.compile(r"^#{1,6} \S|\*\*[^*\n]+\*\*", re.M)


def raw_markdown_outputs(notebook) -> list[str]:
    """The plain-text outputs (stdout/stderr streams and text/plain) that hold raw Markdown, as
    ``cell <i>: <text>``; Markdown must be displayed (``IPython.display.Markdown``), not printed."""
    found = []
    for index, cell in enumerate(notebook.cells):
        for output in cell.get("outputs", []):
            texts = [output.get("text", "")] if output.get("output_type") == "stream" else []
            texts.append(output.get("data", {}).get("text/plain", ""))
            found += [f"cell {index}: {text[:200]!r}" for text in texts
                      if isinstance(text, str) and RAW_MARKDOWN.search(text)]
    return found


def test_raw_markdown_detector_on_synthetic_outputs():
    """The check the two executed notebooks must pass, on outputs written by hand: printed Markdown
    fails it, displayed Markdown (text/markdown beside a text/plain repr) and plain numbers pass."""
    notebook = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell(outputs=[nbformat.v4.new_output(
            "stream", name="stdout", text="## Promotion\n**m v1: promoted** to `champion`.\n")]),
        nbformat.v4.new_code_cell(outputs=[nbformat.v4.new_output(
            "display_data", data={"text/markdown": "## Promotion\n**m v1: promoted**",
                                  "text/plain": "<IPython.core.display.Markdown object>"})]),
        nbformat.v4.new_code_cell(outputs=[nbformat.v4.new_output(
            "execute_result", data={"text/plain": "'**bold** in a repr'"}, execution_count=1)]),
        nbformat.v4.new_code_cell(outputs=[nbformat.v4.new_output(
            "stream", name="stdout", text="SFTFlow/1 finished; loss 2 ** 3 = 8, #1 of 2\n")]),
    ])
    found = raw_markdown_outputs(notebook)
    assert [f.split(":")[0] for f in found] == ["cell 0", "cell 2"], found
    assert "## Promotion" in found[0]


@pytest.mark.slow
def test_inspect_run_executes_against_the_run(default_run):
    notebook = execute("inspect_run", {**default_run.env, "POSTTRAIN_RUN": default_run.pathspec})
    text, num_png = outputs_of(notebook)
    assert default_run.pathspec in text
    assert "<mark>" in text  # the masked conversation, trained tokens highlighted
    # 2 length histograms + loss + lr + task_score and eval_loss across checkpoints
    assert num_png == 6
    assert "catalog-assistant v1: promoted" in text and "{'champion': 1}" in text
    assert not raw_markdown_outputs(notebook), raw_markdown_outputs(notebook)


@pytest.mark.slow
def test_compare_runs_executes_side_by_side(default_run):
    # One run compared with itself: the test session shares a single SFTFlow run (a second costs
    # minutes on CI); the notebook does not care whether the two pathspecs differ.
    pair = f"{default_run.pathspec},{default_run.pathspec}"
    notebook = execute("compare_runs", {**default_run.env, "POSTTRAIN_RUNS": pair})
    text, num_png = outputs_of(notebook)
    assert num_png == 3 and "the two recipes are the same" in text
    assert "promoted" in text and not raw_markdown_outputs(notebook), raw_markdown_outputs(notebook)
