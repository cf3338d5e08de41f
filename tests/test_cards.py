"""Card content (steps/cards.py) on exact inputs, and the cards of a real SFTFlow run.

The end-to-end run (``sft_run``) is made once per test session and shared with
tests/test_notebooks.py, which executes the notebooks against it.
"""

import base64
import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from steps import cards

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CURVE = [{"step": 4, "loss": 2.5, "lr": 1e-3, "tokens_per_s": 900.0},
         {"step": 8, "loss": 2.1, "lr": 8e-4, "tokens_per_s": 1100.0}]


def test_train_card_has_two_png_plots_and_the_throughput():
    blocks = cards.train_card(CURVE)
    images = [b["image"] for b in blocks if "image" in b]
    assert len(images) == 2 and all(png.startswith(PNG_MAGIC) for png in images)
    assert "**1,000 tokens/s**" in blocks[0]["markdown"] and "last window 1,100 tokens/s" in blocks[0]["markdown"]
    assert blocks[-1]["table"] == [[4, 2.5, "0.001", 900], [8, 2.1, "0.0008", 1100]]


def test_token_lengths_split_rows_at_position_zero(tmp_path):
    path = tmp_path / "part-00000.parquet"
    pq.write_table(pa.table({"position_ids": [[0, 1, 2, 0, 1], [0, 1, 2, 3]]}), path)
    assert cards.token_lengths([str(path)]) == {"row_tokens": [5, 4], "document_tokens": [3, 2, 4]}


def test_masked_example_marks_trained_runs_and_escapes_html():
    html = cards.masked_example_html("<s>user: a<b</s>[[ok</s>]]x[[y]]")
    assert html == ('<pre style="white-space: pre-wrap">&lt;s&gt;user: a&lt;b&lt;/s&gt;'
                    '<mark>ok&lt;/s&gt;</mark>x<mark>y</mark></pre>')


def test_metrics_table_orders_base_champion_then_checkpoints():
    rows = [{"checkpoint": "step-000024", "task_score": 0.75, "eval_loss": 1.25},
            {"checkpoint": "base", "task_score": 0.0, "eval_loss": 4.0},
            {"checkpoint": "step-000012", "task_score": 0.5, "eval_loss": 1.5}]
    table = cards.metrics_table(rows, {"version": 3, "metrics": {"task_score": 0.625}})
    assert table["headers"] == ["model", "task_score", "eval_loss"]
    assert table["table"] == [["base", 0.0, 4.0], ["champion v3", 0.625, ""],
                              ["step-000012", 0.5, 1.5], ["step-000024", 0.75, 1.25]]


def test_promotion_markdown_states_the_decision():
    text = cards.promotion_markdown("m", 2, {"promoted": True, "alias": "champion", "reason": "no current champion"})
    assert text == "## Promotion\n**m v2: promoted** to `champion`.\n\nno current champion"


# --------------------------------------------------------------------------------------------
# A real run, shared by the card and notebook tests



def run_sft(recipe_path: Path, sysroot: Path, **run_kwargs):
    """Run SFTFlow like ``test_flow.run_flow``, but from ``sysroot`` so that its cards can be read.

    A local run writes its cards under ``<cwd>/.metaflow/mf.cards`` (the nearest ``.metaflow``
    folder), and the card client reads them from ``<datastore>/mf.cards``. Running from the
    folder that holds the datastore makes the two the same place, as ``python flows/sft_flow.py
    run`` from the repository root does with the default ``./.metaflow``.
    """
    from metaflow import Runner
    from test_flow import FLOW

    env = {"METAFLOW_DATASTORE_SYSROOT_LOCAL": str(sysroot), "METAFLOW_USER": "posttrain-tests",
           "HF_HUB_OFFLINE": "1"}
    (sysroot / ".metaflow").mkdir(parents=True, exist_ok=True)
    with Runner(str(FLOW), show_output=False, env=env, cwd=str(sysroot),
                config=[("recipe", str(recipe_path))]) as runner:
        result = runner.run(**run_kwargs)
        assert result.status == "successful", result.stdout[-4000:] + result.stderr[-8000:]
        return result.run


def tiny_recipe(root: Path, **overrides) -> Path:
    """``test_flow.small_recipe`` cut to 12 steps (checkpoints at 6 and 12) to keep the session short.

    ``overrides`` are merged into the sections: ``tiny_recipe(root, train={"fail_at_step": 9})``.
    """
    from test_flow import small_recipe

    sections = {"data": {"builtin_num_conversations": 400, "eval_fraction": 0.1},
                "train": {"micro_batch_tokens": 2048, "global_batch_tokens": 2048, "max_steps": 12,
                          "warmup_steps": 2, "lr": 3e-3, "save_every_steps": 6, "log_every_steps": 2},
                "evaluate": {"num_task_prompts": 8, "max_new_tokens": 16, "generation_batch_size": 8}}
    for key, value in overrides.items():
        sections[key] = {**sections[key], **value} if isinstance(value, dict) and key in sections else value
    return small_recipe(root, **sections)


_RUN_CACHE: dict = {}


@pytest.fixture(scope="session")
def sft_run(tmp_path_factory, builtin_model_dir):
    """One small SFTFlow run, made once per session: ``{"pathspec", "sysroot", "storage", "env"}``."""
    if "run" not in _RUN_CACHE:
        from metaflow import metadata

        root = tmp_path_factory.mktemp("sft-run")
        sysroot = root / "metaflow"
        run = run_sft(tiny_recipe(root), sysroot)
        metadata(f"local@{sysroot}")
        _RUN_CACHE["run"] = {"pathspec": run.pathspec, "sysroot": str(sysroot), "storage": str(root / "storage"),
                             "env": {"METAFLOW_DATASTORE_SYSROOT_LOCAL": str(sysroot)}}
    return _RUN_CACHE["run"]


def card_html(task) -> list[str]:
    from metaflow.cards import get_cards

    return [card.get() for card in get_cards(task)]


def card_components(html: str) -> list[dict]:
    """The components a card shows: the base64 JSON that Metaflow embeds in the HTML, flattened."""
    encoded = re.search(r'window\.__MF_DATA__\["[^"]+"\] = "([^"]+)"', html).group(1)
    data = json.loads(base64.b64decode(encoded))
    flat, stack = [], list(data["components"])
    while stack:
        component = stack.pop(0)
        flat.append(component)
        stack[:0] = component.get("contents") or []
    return flat


def external_fetches(html: str) -> list[str]:
    """URLs the page's tags would load: <script src>, <link href>, <img src> outside data: URIs."""
    return re.findall(r'<(?:script|img|iframe)[^>]*\ssrc="(https?:[^"]+)"', html) + \
        re.findall(r'<link[^>]*\shref="(https?:[^"]+)"', html)


@pytest.mark.slow
def test_cards_of_a_run_hold_png_plots_and_tables(sft_run):
    from metaflow import Run, namespace

    namespace(None)
    run = Run(sft_run["pathspec"])
    expected = {"tokenize": (2, "Packing efficiency"), "train": (2, "tokens/s"),
                "join_evaluate": (2, "Best checkpoint"), "register": (0, "catalog-assistant v1: promoted")}
    for step_name, (num_images, text) in expected.items():
        tasks = list(run[step_name])
        pages = [html for task in tasks for html in card_html(task)]
        assert pages, f"no card on {step_name}"
        # @parallel: every node gets a card, only node 0 has the curves.
        components = [c for html in pages for c in card_components(html)]
        images = [c for c in components if c["type"] == "image"]
        assert len(images) == num_images, (step_name, [c["type"] for c in components])
        for image in images:
            assert image["src"].startswith("data:image/png;base64,")
            assert base64.b64decode(image["src"].split(",", 1)[1]).startswith(PNG_MAGIC)
        assert any(text in (c.get("source") or "") for c in components), (step_name, components)
        for html in pages:
            # The cards work offline: every script, style sheet and image is inline. (Metaflow's own
            # template CSS still @imports a Google font; browsers fall back to local fonts without it.)
            assert external_fetches(html) == [], step_name
    tables = [c for c in card_components(card_html(run["register"].task)[0]) if c["type"] == "table"]
    data = run["end"].task.data
    assert [row[0] for row in tables[0]["data"]] == ["base", "step-000006", "step-000012"]
    assert data.promotion["promoted"] is True and data.model_version == 1
