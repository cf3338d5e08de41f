"""The fast renderer: a dataset's renders from a few Jinja runs, rendered and labelled in batches.

:func:`steps.chat.template.tokenize_conversation` renders each conversation with Jinja,
up to three times per trained turn. A dataset gets the same text and labels faster
(``bench/bench_data.py``):

- Most templates only print each content (``content_opaque_violation``), so a dataset's renders
  come from a few Jinja renders, one per conversation *shape* (its roles), with the contents
  filled in (:class:`_TemplateSkeletons`; the first renders are checked against Jinja)::

      shape     [user ⟨0⟩, assistant ⟨1⟩]   rendered once: "<|im_start|>user\\n⟨0⟩<|im_end|>\\n..."
      filled    ["Hi", "Hello!"]            "<|im_start|>user\\nHi<|im_end|>\\n..."

- Where a template has ``{% generation %}`` markers, the marked spans of one render replace the
  content search once they agreed with it on the first conversations (:class:`_MarkerShortcut`).
- A batch is tokenized by one call of the Rust tokenizer, and trained spans become token ranges
  through ``char_to_token`` rather than per-token offsets (:func:`_label_batch`).

``steps.chat.writer`` runs these batches in this process (the tokenizer encoding on a second
thread) or in worker processes.
"""

from __future__ import annotations

import functools
import itertools
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from steps.chat.template import (
    ChatTemplateError,
    ConversationTooLong,
    NoTrainedTokens,
    _encode,
    _EndOfTurnCheck,
    _limit_length,
    _plain_chat,
    _render,
    _render_conversation,
    _render_with_markers,
    _RenderedConversation,
    _trained_mask,
    content_opaque_violation,
    marked_conversation,
    marked_template,
    markers_cover,
)

# ---------------------------------------------------------------------------------------------
# Template skeletons: the renders of a dataset without running Jinja per conversation

# A content's placeholder in a skeleton: private-use characters that no template writes.
_SLOT_OPEN, _SLOT_CLOSE = "\ue000", "\ue001"
_SLOT = re.compile(f"{_SLOT_OPEN}(\\d+){_SLOT_CLOSE}")


@dataclass(frozen=True, slots=True)
class _Skeleton:
    """A rendering with its contents cut out: ``pieces[0] + content[slots[0]] + pieces[1] + ...``.

    Marker spans are kept as ``(contents before, template characters before)`` of their start
    and end, since their character positions move with the lengths of the contents.
    """

    pieces: tuple[str, ...]
    slots: tuple[int, ...]
    marks: tuple[tuple[tuple[int, int], tuple[int, int]], ...] = ()

    @classmethod
    def parse(cls, text: str, indices: Sequence[tuple[int, int]] = ()) -> _Skeleton | None:
        """The skeleton of a rendering of placeholders; None if a placeholder came out mangled or a mark splits one."""
        pieces, slots, slot_bounds = [], [], []
        position = 0
        for match in _SLOT.finditer(text):
            pieces.append(text[position:match.start()])
            slots.append(int(match.group(1)))
            slot_bounds.append((match.start(), match.end()))
            position = match.end()
        pieces.append(text[position:])
        if text.count(_SLOT_OPEN) != len(slots) or text.count(_SLOT_CLOSE) != len(slots):
            return None

        def anchor(position: int) -> tuple[int, int] | None:
            num_before, slot_chars = 0, 0
            for start, end in slot_bounds:
                if end <= position:
                    num_before, slot_chars = num_before + 1, slot_chars + end - start
                elif start < position:
                    return None
            return num_before, position - slot_chars

        marks = [(anchor(start), anchor(end)) for start, end in indices]
        if any(None in mark for mark in marks):
            return None
        return cls(tuple(pieces), tuple(slots), tuple(marks))

    def fill(self, contents: Sequence[str]) -> tuple[str, list[tuple[int, int]]]:
        """The rendering of ``contents`` and its marker spans."""
        slot_contents = [contents[slot] for slot in self.slots]
        parts = [""] * (2 * len(slot_contents) + 1)
        parts[0::2] = self.pieces
        parts[1::2] = slot_contents
        if not self.marks:
            return "".join(parts), []
        content_chars = [0, *itertools.accumulate(map(len, slot_contents))]  # characters of the first k contents
        marks = [(content_chars[start[0]] + start[1], content_chars[end[0]] + end[1]) for start, end in self.marks]
        return "".join(parts), marks


class _TemplateSkeletons:
    """Renders a chat template once per conversation *shape* (its roles) and fills the contents in.

    For a template that only prints contents (:func:`content_opaque_violation`), rendering
    ``[user "Hi", assistant "Hello!"]`` is rendering ``[user ⟨0⟩, assistant ⟨1⟩]`` with ``Hi`` put
    for ``⟨0⟩`` and ``Hello!`` for ``⟨1⟩``. A dataset has few shapes, so Jinja runs a few times
    per dataset instead of once per prefix render of every conversation, and the content search
    and marker spans of :func:`_render_conversation` / :class:`_MarkerShortcut` are computed on
    exactly the text the template gives. As a second guard, the first ``NUM_VERIFIED`` renders,
    and the first of every shape, are compared with the template's own rendering; one
    difference turns the skeletons off for good. A template that raises for a shape raises the
    same error for every conversation of that shape.
    """

    NUM_VERIFIED = 64
    MAX_SHAPES = 4096

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        try:
            self.template = tokenizer.get_chat_template()
        except (ValueError, TypeError):
            self.template = None
        self.violation = content_opaque_violation(self.template) if self.template else "no chat template"
        self.enabled = self.violation is None
        self.num_verified = 0
        self._skeletons: dict[tuple, _Skeleton | ChatTemplateError | None] = {}

    def _render_placeholders(self, key: tuple, render_real: Callable) -> _Skeleton | ChatTemplateError | None:
        roles = key[0]
        chat = [{"role": role, "content": f"{_SLOT_OPEN}{index}{_SLOT_CLOSE}"} for index, role in enumerate(roles)]
        try:
            text, indices = render_real(chat)
        except ChatTemplateError as error:
            return error
        return _Skeleton.parse(text, indices)

    def _fill(self, key: tuple, messages: Sequence[Mapping],
              render_real: Callable) -> tuple[str, list[tuple[int, int]]]:
        if not self.enabled:
            return render_real(_plain_chat(messages))
        skeleton = self._skeletons.get(key, ...)
        is_new = skeleton is ...
        if is_new:
            if len(self._skeletons) >= self.MAX_SHAPES:  # a dataset of ever new shapes: Jinja renders the rest
                return render_real(_plain_chat(messages))
            skeleton = self._skeletons[key] = self._render_placeholders(key, render_real)
        chat = _plain_chat(messages) if skeleton is None or is_new or self.num_verified < self.NUM_VERIFIED else None
        if skeleton is None:  # this shape cannot be cut into pieces: the template renders it
            return render_real(chat)
        if isinstance(skeleton, ChatTemplateError):
            outcome: tuple | ChatTemplateError = ChatTemplateError(str(skeleton), skeleton.reason)
        else:
            outcome = skeleton.fill([message["content"] for message in messages])
        if is_new or self.num_verified < self.NUM_VERIFIED:
            self.num_verified += 1
            try:
                expected: tuple | ChatTemplateError = render_real(chat)
            except ChatTemplateError as error:
                expected = error
            same = (str(outcome) == str(expected) if isinstance(outcome, ChatTemplateError)
                    else outcome == expected)
            if not same:
                self.enabled = False  # the template does read the content somehow: render every conversation
                self._skeletons.clear()
                outcome = expected
        if isinstance(outcome, ChatTemplateError):
            raise outcome
        return outcome

    def render(self, chat: list[dict], add_generation_prompt: bool) -> str:
        """``_render(tokenizer, chat, add_generation_prompt)``, from the skeleton of the chat's shape."""
        def render_real(messages):
            return _render(self.tokenizer, messages, add_generation_prompt), []

        key = (tuple(message["role"] for message in chat), add_generation_prompt, False)
        return self._fill(key, chat, render_real)[0]

    def render_marked(self, messages: Sequence[Mapping]) -> tuple[str, list[tuple[int, int]]]:
        """``_render_with_markers(tokenizer, template, messages)``, from the skeleton of the messages' shape."""
        key = (tuple(message["role"] for message in messages), False, True)
        return self._fill(key, messages, functools.partial(_render_with_markers, self.tokenizer, self.template))


# ---------------------------------------------------------------------------------------------
# One render per conversation for templates with generation markers


class _MarkerShortcut:
    """One render per conversation for templates with ``{% generation %}`` markers, once proven.

    :func:`_render_conversation` renders every trained turn's prefixes (up to three renders
    per turn) to find its text. Where the template marks the assistant's text itself, one
    render gives every span (what ``return_assistant_tokens_mask`` uses). The marked spans are
    the labels wherever they cover each content and its end-of-turn text (``markers_cover``:
    a marked leading space or role header is trained, as transformers' mask has it). They are
    trusted without the content search once they covered it on the first ``NUM_CHECKED``
    conversations of this process; one conversation where they do not (say, markers that leave
    the end-of-turn token out) and the content search is used for everything.
    """

    NUM_CHECKED = 64

    def __init__(self, tokenizer, skeletons: _TemplateSkeletons | None = None):
        self.template = marked_template(tokenizer)
        self.enabled = self.template is not None
        self.num_agreed = 0
        self.skeletons = skeletons
        """Renders without Jinja where the template allows it (None: Jinja renders everything)."""

    def _render_marked(self, tokenizer, messages: Sequence[Mapping]) -> _RenderedConversation | None:
        if self.skeletons is not None:
            text, indices = self.skeletons.render_marked(messages)
        else:
            text, indices = _render_with_markers(tokenizer, self.template, _plain_chat(messages))
        return marked_conversation(messages, text, indices)  # None: the content search decides

    def render(self, tokenizer, messages: Sequence[Mapping], is_end_of_turn: _EndOfTurnCheck) -> _RenderedConversation:
        render = self.skeletons.render if self.skeletons is not None else None
        if not self.enabled:
            return _render_conversation(tokenizer, messages, is_end_of_turn, render=render)
        marked = self._render_marked(tokenizer, messages)
        if marked is not None and self.num_agreed >= self.NUM_CHECKED:
            return marked
        searched = _render_conversation(tokenizer, messages, is_end_of_turn, render=render)
        if marked is not None and searched.spans:
            if markers_cover(marked, searched):
                self.num_agreed += 1
                return marked
            self.enabled = False
        return searched


# ---------------------------------------------------------------------------------------------
# Batches: render, tokenize in one call, label


class LabelSettings(NamedTuple):
    """What labelling a batch needs; made once per dataset (:meth:`for_tokenizer`) and sent to worker processes."""

    tokenizer: object
    is_end_of_turn: _EndOfTurnCheck
    shortcut: _MarkerShortcut
    max_seq_tokens: int | None
    truncation: str

    @classmethod
    def for_tokenizer(cls, tokenizer, max_seq_tokens: int | None, truncation: str) -> LabelSettings:
        return cls(tokenizer, _EndOfTurnCheck(tokenizer), _MarkerShortcut(tokenizer, _TemplateSkeletons(tokenizer)),
                   max_seq_tokens, truncation)


def _render_batch(settings: LabelSettings, conversations: list) -> tuple[list, list[int], list[_RenderedConversation]]:
    """Render a batch: ``(outcomes, positions, rendered)``, ``rendered[k]`` for conversation ``positions[k]``.

    ``outcomes`` already holds the ``ChatTemplateError`` of each conversation that failed to render.
    """
    tokenizer, is_end_of_turn, shortcut = settings.tokenizer, settings.is_end_of_turn, settings.shortcut
    outcomes: list = [None] * len(conversations)
    rendered, positions = [], []
    for position, messages in enumerate(conversations):
        try:
            rendered.append(shortcut.render(tokenizer, messages, is_end_of_turn))
            positions.append(position)
        except ChatTemplateError as error:
            outcomes[position] = error
    return outcomes, positions, rendered


def _label_rendered(settings: LabelSettings, outcomes: list, positions: list[int],
                    rendered: list[_RenderedConversation], encodings: list) -> list:
    """Fill ``outcomes`` (see :func:`_label_batch`) from the encodings of the rendered conversations."""
    tokenizer, max_seq_tokens, truncation = settings.tokenizer, settings.max_seq_tokens, settings.truncation
    for position, item, encoding in zip(positions, rendered, encodings):
        try:
            trained, turn_token_ends = _trained_mask(item, encoding, tokenizer)
            num_kept = _limit_length(len(trained), turn_token_ends, max_seq_tokens, truncation)
        except ChatTemplateError as error:
            outcomes[position] = error
        except NoTrainedTokens:
            outcomes[position] = "no_trained_tokens"
        except ConversationTooLong:
            outcomes[position] = "too_long"
        else:
            outcomes[position] = (np.array(encoding.ids[:num_kept], dtype=np.int32), trained[:num_kept],
                                  num_kept < len(trained))
    return outcomes


def _label_batch(settings: LabelSettings, conversations: list) -> list:
    """Render, tokenize (one call) and label a batch; one outcome per conversation, in order.

    An outcome is ``(input_ids int32 array, trained bool array, truncated)``, ``"no_trained_tokens"``,
    ``"too_long"``, or the ``ChatTemplateError`` (the caller decides whose fault it is).
    """
    outcomes, positions, rendered = _render_batch(settings, conversations)
    encodings = _encode(settings.tokenizer, [item.text for item in rendered]) if rendered else []
    return _label_rendered(settings, outcomes, positions, rendered, encodings)


_WORKER_SETTINGS: tuple | None = None
