"""Card content (steps/cards.py) on exact inputs, and the cards of a real SFTFlow run.

The run is the session's default run (``default_run`` in tests/conftest.py), shared with
tests/test_notebooks.py and tests/test_flow.py.
"""

import base64
import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from steps import cards
from test_flow import tiny_recipe  # noqa: F401  (lived here before; other tests may import it from here)

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
# The cards of a real run: the session's default run (tests/conftest.py, ``default_run``)

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
def test_cards_of_a_run_hold_png_plots_and_tables(default_run):
    run = default_run.client_run()
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
    assert [row[0] for row in tables[0]["data"]] == ["base", "step-000100", "step-000200", "step-000300",
                                                      "step-000400"]
    assert data.promotion["promoted"] is True and data.model_version == 1


@pytest.mark.slow
def test_every_card_renders_from_a_real_runs_artifacts_with_the_one_metric_list(default_run, monkeypatch):
    """The cards, drawn again from the default run's artifacts: every metric of
    ``steps.contracts.METRICS`` is a column of the evaluation and register tables (the run's
    rows have them all), and the evaluation plots put each checkpoint at its optimizer step."""
    from steps.contracts import METRICS

    run = default_run.client_run()
    data = run["end"].task.data
    assert all(key in data.best_checkpoint for key in METRICS), sorted(data.best_checkpoint)
    # The card Metaflow stored for join_evaluate shows every metric (assistant_token_accuracy included).
    stored = [c for c in card_components(card_html(run["join_evaluate"].task)[0]) if c["type"] == "table"]
    assert stored and all(key in stored[0]["columns"] for key in METRICS), stored[0]["columns"]

    plotted = {}

    def capture(series, *, title, **kwargs):
        plotted[title] = series
        return PNG_MAGIC

    monkeypatch.setattr(cards, "line_plot_png", capture)
    evaluation = cards.evaluate_card(data.eval_metrics, data.best_checkpoint)
    register = cards.register_card(data.model_name, data.model_version, data.model_uri, data.eval_metrics,
                                   data.best_checkpoint, data.promotion)
    for blocks in (evaluation, register):
        headers = next(block for block in blocks if "table" in block)["headers"]
        assert headers == ["model", *METRICS]
    steps = [int(Path(path).name.split("-")[1]) for path in data.checkpoints]
    assert steps == [100, 200, 300, 400]
    for key in ("task_score", "eval_loss"):
        xs, ys = plotted[key]["checkpoints"]
        assert list(xs) == steps, (key, xs)
        by_step = {row["step"]: row[key] for row in data.eval_metrics if "step" in row}
        assert list(ys) == [by_step[step] for step in steps]
    assert cards.train_card(data.train_curve)[0]["markdown"].startswith("## Training")
    assert "Packing efficiency" in cards.tokenize_card(data.token_stats)[0]["markdown"]
