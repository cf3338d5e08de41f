"""Turn ``steps.cards`` blocks into Metaflow card components (the only metaflow-aware part of the cards).

    show(cards.train_card(self.train_curve))   # inside a step decorated with @card(type="blank")
"""

from metaflow import current
from metaflow.cards import Image, Markdown, Table


def show(blocks: list[dict]) -> None:
    """Append one component per block to the current step's card (see steps/cards.py for blocks)."""
    for block in blocks:
        if "image" in block:
            current.card.append(Image(block["image"], label=block.get("label")))
        elif "table" in block:
            current.card.append(Table(block["table"], headers=block["headers"]))
        else:
            current.card.append(Markdown(block["markdown"]))
