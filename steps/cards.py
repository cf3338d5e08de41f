"""What the Metaflow cards show, as plain data: PNG plots, tables, markdown and HTML strings.

Nothing here imports metaflow. Each ``*_card`` function returns a list of *blocks*, and the
flow turns every block into one ``metaflow.cards`` component (``flows/card_view.py``)::

    {"markdown": "## Training"}                       -> Markdown
    {"image": b"\\x89PNG...", "label": "loss"}         -> Image (embedded as a data: URI)
    {"table": [[1, 0.5]], "headers": ["step", "loss"]} -> Table

Plots are rendered with matplotlib's Agg backend into PNG bytes, so a card holds its images
inline and needs no plotting library in the browser. The notebooks call the same functions
and show the PNGs and HTML with IPython.display.

Example::

    >>> blocks = train_card([{"step": 4, "loss": 2.5, "lr": 1e-3, "tokens_per_s": 900.0},
    ...                      {"step": 8, "loss": 2.1, "lr": 8e-4, "tokens_per_s": 1100.0}])
    >>> [next(iter(b)) for b in blocks]
    ['markdown', 'image', 'image', 'table']
"""

from __future__ import annotations

import html
import io
import re
from collections.abc import Sequence

import pyarrow.parquet as pq

from steps.contracts import BASELINE_ROW, METRICS, baseline_row, row_step, scored_checkpoints
_TRAINED_RUN = re.compile(r"\[\[(.*?)\]\]", re.DOTALL)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display on workers; must precede the pyplot import
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    _pyplot().close(fig)
    return buffer.getvalue()


def line_plot_png(series: dict[str, tuple[Sequence[float], Sequence[float]]], *, title: str, xlabel: str,
                  ylabel: str, log_y: bool = False) -> bytes:
    """A line plot of named ``(x, y)`` series as PNG bytes (one line per series, with a legend)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for name, (xs, ys) in series.items():
        ax.plot(list(xs), list(ys), marker="." if len(xs) < 30 else None, label=name)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    if log_y:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend()
    return _png(fig)


def histogram_png(values: Sequence[int], *, title: str, xlabel: str, num_bins: int = 30) -> bytes:
    """A histogram of ``values`` as PNG bytes."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.hist(list(values), bins=num_bins, color="#4c72b0")
    ax.set(title=title, xlabel=xlabel, ylabel="count")
    ax.grid(alpha=0.3)
    return _png(fig)


def throughput(train_curve: Sequence[dict]) -> dict:
    """Tokens/s over the logged windows: ``{"mean_tokens_per_s", "last_tokens_per_s", "num_points"}``.

    >>> throughput([{"tokens_per_s": 900.0}, {"tokens_per_s": 1100.0}])
    {'mean_tokens_per_s': 1000.0, 'last_tokens_per_s': 1100.0, 'num_points': 2}
    """
    rates = [row["tokens_per_s"] for row in train_curve]
    return {"mean_tokens_per_s": sum(rates) / len(rates) if rates else 0.0,
            "last_tokens_per_s": rates[-1] if rates else 0.0, "num_points": len(rates)}


def train_card(train_curve: Sequence[dict]) -> list[dict]:
    """The train step's card: loss and learning-rate curves (PNG) and tokens/s per log window,
    with achieved TFLOP/s per device and MFU where the trainer measured them (MFU on GPUs only).

    >>> train_card([{"step": 4, "loss": 2.5, "lr": 1e-3, "tokens_per_s": 900.0, "tflops_per_device": 312.0,
    ...              "mfu": 0.3153}])[-1]
    {'table': [[4, 2.5, '0.001', 900, 312.0, '31.5%']], 'headers': ['step', 'loss', 'lr', 'tokens/s', 'TFLOP/s/device', 'MFU']}
    """
    steps = [row["step"] for row in train_curve]
    speed = throughput(train_curve)
    with_flops = bool(train_curve) and all("tflops_per_device" in row for row in train_curve)
    mfus = [row["mfu"] for row in train_curve if row.get("mfu") is not None]
    mfu_text = f", mean MFU **{100 * sum(mfus) / len(mfus):.1f}%**" if mfus else ""

    def flops_cells(row: dict) -> list:
        if not with_flops:
            return []
        return [round(row["tflops_per_device"], 3), "n/a" if row.get("mfu") is None else f"{100 * row['mfu']:.1f}%"]

    return [
        {"markdown": f"## Training\n{len(steps)} logged points up to step {steps[-1] if steps else 0}; "
                     f"mean throughput **{speed['mean_tokens_per_s']:,.0f} tokens/s** "
                     f"(last window {speed['last_tokens_per_s']:,.0f} tokens/s){mfu_text}."},
        {"image": line_plot_png({"train loss": (steps, [row["loss"] for row in train_curve])},
                                title="Training loss", xlabel="optimizer step", ylabel="loss"),
         "label": "loss"},
        {"image": line_plot_png({"lr": (steps, [row["lr"] for row in train_curve])},
                                title="Learning rate", xlabel="optimizer step", ylabel="lr"),
         "label": "learning rate"},
        {"table": [[row["step"], round(row["loss"], 4), f"{row['lr']:.3g}", round(row["tokens_per_s"]),
                    *flops_cells(row)] for row in train_curve],
         "headers": ["step", "loss", "lr", "tokens/s"] + (["TFLOP/s/device", "MFU"] if with_flops else [])},
    ]


def token_lengths(token_uris: Sequence[str]) -> dict[str, list[int]]:
    """Lengths in tokens of the packed rows and of the conversations inside them.

    A conversation starts where ``position_ids`` is 0, so a row with position_ids
    ``[0, 1, 2, 0, 1]`` holds conversations of 3 and 2 tokens in a row of 5.
    """
    rows, documents = [], []
    for uri in token_uris:
        for position_ids in pq.read_table(uri, columns=["position_ids"]).column("position_ids").to_pylist():
            rows.append(len(position_ids))
            starts = [i for i, p in enumerate(position_ids) if p == 0] + [len(position_ids)]
            documents += [end - start for start, end in zip(starts, starts[1:])]
    return {"row_tokens": rows, "document_tokens": documents}


def masked_example_html(example: str) -> str:
    """Render ``chat.example_masked_text``'s ``[[trained]]`` markup as HTML with ``<mark>`` runs.

    >>> masked_example_html("user: Hi <b>\\nassistant: [[Hello!]]")
    '<pre style="white-space: pre-wrap">user: Hi &lt;b&gt;\\nassistant: <mark>Hello!</mark></pre>'
    """
    pieces, end = [], 0
    for match in _TRAINED_RUN.finditer(example):
        pieces.append(html.escape(example[end:match.start()]))
        pieces.append(f"<mark>{html.escape(match.group(1))}</mark>")
        end = match.end()
    pieces.append(html.escape(example[end:]))
    return f'<pre style="white-space: pre-wrap">{"".join(pieces)}</pre>'


def tokenize_card(token_stats: dict) -> list[dict]:
    """The tokenize step's card: counts, packing efficiency, length histograms, one masked example.

    The records are conversations (SFT, distillation) or preference pairs (DPO: ``num_pairs``,
    ``num_packed_pairs``, both sequences of a pair in one row).
    """
    lengths = token_lengths(token_stats["train"]["uris"])
    kind = "pairs" if "num_pairs" in token_stats["train"] else "conversations"
    rows = [[split, s[f"num_{kind}"], s[f"num_packed_{kind}"], s["num_rows"], s["num_tokens"],
             s["num_trained_tokens"], f"{s['packing_efficiency']:.3f}", s["num_dropped_too_long"]]
            for split, s in token_stats.items() if isinstance(s, dict) and "num_rows" in s]
    row_tokens = token_stats["train"].get("max_seq_tokens") or max(lengths["row_tokens"], default=0)
    return [
        {"markdown": f"## Tokenization\nPacking efficiency (train): **{token_stats['packing_efficiency']:.3f}** "
                     f"of {row_tokens}-token rows hold real tokens."},
        {"table": rows, "headers": ["split", kind, "packed", "rows", "tokens", "trained tokens",
                                    "packing efficiency", "dropped (too long)"]},
        {"image": histogram_png(lengths["document_tokens"], title=f"{kind[:-1].capitalize()} length (train)",
                                xlabel="tokens"), "label": "conversation lengths"},
        {"image": histogram_png(lengths["row_tokens"], title="Packed row length (train)", xlabel="tokens"),
         "label": "packed row lengths"},
        {"markdown": f"### One training {kind[:-1]}\nHighlighted tokens are trained (labels != -100); "
                     "the rest is context only.\n\n" + masked_example_html(token_stats["example"])},
    ]


def metrics_table(eval_metrics: Sequence[dict], champion: dict | None = None,
                  extra_metrics: Sequence[str] = ()) -> dict:
    """Checkpoints against the baseline (``base``) and, if given, the registry's champion.

    ``champion`` is ``{"version": N, "metrics": {...}}``. Returns one table block; rows are the
    baseline, the champion, then checkpoints in step order, with the metrics of
    ``steps.contracts.METRICS`` and then of ``extra_metrics`` (a method's own) that any row has.

    >>> metrics_table([{"checkpoint": "step-000002", "task_score": 0.5}, {"checkpoint": "base", "task_score": 0.1}])
    {'table': [['base', 0.1], ['step-000002', 0.5]], 'headers': ['model', 'task_score']}
    """
    rows = sorted(eval_metrics, key=lambda row: (row["checkpoint"] != BASELINE_ROW, row_step(row), row["checkpoint"]))
    named = [(row["checkpoint"], row) for row in rows]
    if champion:
        named.insert(1 if rows and rows[0]["checkpoint"] == BASELINE_ROW else 0,
                     (f"champion v{champion['version']}", champion["metrics"]))
    keys = [k for k in (*METRICS, *extra_metrics) if any(k in row for _, row in named)]
    table = [[name, *[_rounded(row.get(k)) for k in keys]] for name, row in named]
    return {"table": table, "headers": ["model", *keys]}


def evaluate_card(eval_metrics: Sequence[dict], best: dict, champion: dict | None = None,
                  extra_metrics: Sequence[str] = ()) -> list[dict]:
    """The evaluation card: the metrics table and a plot of each metric across checkpoints, at
    their optimizer steps (the baseline as a flat line)."""
    checkpoints = sorted(scored_checkpoints(eval_metrics), key=row_step)
    blocks = [{"markdown": f"## Evaluation\nBest checkpoint: **{best['checkpoint']}**"},
              metrics_table(eval_metrics, champion, extra_metrics)]
    baseline = baseline_row(eval_metrics)
    for key in ("task_score", "eval_loss"):
        if checkpoints and key in checkpoints[0]:
            steps = [row_step(row) for row in checkpoints]
            series = {"checkpoints": (steps, [row[key] for row in checkpoints])}
            if baseline and key in baseline:
                series[BASELINE_ROW] = (steps, [baseline[key]] * len(steps))
            blocks.append({"image": line_plot_png(series, title=key, xlabel="optimizer step", ylabel=key),
                           "label": key})
    return blocks


def promotion_markdown(model_name: str, model_version: int, promotion: dict) -> str:
    """One paragraph on the gate's decision: promoted or kept, and the numbers behind it.

    >>> promotion_markdown("m", 2, {"promoted": False, "alias": "champion", "reason": "kept: 0.4 vs 0.5"})
    '## Promotion\\n**m v2: not promoted** to `champion`.\\n\\nkept: 0.4 vs 0.5'
    """
    verdict = "promoted" if promotion.get("promoted") else "not promoted"
    return (f"## Promotion\n**{model_name} v{model_version}: {verdict}** to `{promotion.get('alias', 'champion')}`."
            f"\n\n{promotion.get('reason', '')}")


def register_card(model_name: str, model_version: int, model_uri: str, eval_metrics: Sequence[dict],
                  best: dict, promotion: dict, champion: dict | None = None,
                  extra_metrics: Sequence[str] = ()) -> list[dict]:
    """The register step's card: the gate's decision, then the metrics table against baseline and champion."""
    return [{"markdown": promotion_markdown(model_name, model_version, promotion)},
            {"markdown": f"Registered `{model_uri}` from **{best['checkpoint']}**."},
            metrics_table(eval_metrics, champion, extra_metrics)]


def _rounded(value):
    return round(value, 4) if isinstance(value, float) else ("" if value is None else value)


def registry_version_metrics(registry_root: str, model_name: str, version_or_alias: int | str | None) -> dict | None:
    """``{"version": N, "metrics": {...}}`` of a registry version or alias, or None if there is none.

    The cards use it for the champion row of the metrics table: ``"champion"`` before a
    registration, or the ``champion_version`` of the gate's decision after it.
    """
    from steps.registry import RegistryError, Registry

    if version_or_alias is None:
        return None
    try:
        version = Registry(registry_root).get(model_name, version_or_alias)
    except RegistryError:  # none yet, or a broken manifest: the card shows no champion row
        return None
    return {"version": version.version, "metrics": dict(version.manifest.get("metrics") or {})}
