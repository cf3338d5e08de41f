"""Chat rendering with the model's own template, and labels on the assistant turns only.

A conversation is rendered to text by ``tokenizer.apply_chat_template`` (the model's own
template), tokenized once, and every token outside a trained assistant turn gets label -100.
A trained turn is its content plus the end-of-turn token(s) the template writes after it:
the model has to learn to say them to stop. The turn header and the newline after the
end-of-turn token are scaffolding that the template (or the server) writes, so they are not
trained. With ChatML (``-`` is -100)::

    messages  user "Hi" | assistant "Hello!"
    text      <|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\nHello!<|im_end|>\\n
    tokens    <|im_start|> user \\n Hi <|im_end|> \\n <|im_start|> assistant \\n Hello ! <|im_end|> \\n
    labels    -            -    -  -  -          -  -            -         -  Hello ! <|im_end|> -

No ``{% generation %}`` markers are needed. For each trained assistant message ``i`` the
template renders ``messages[:i]`` with the generation prompt (``P``) and ``messages[:i+1]``
(``F``). ``P`` must be a prefix of ``F`` and ``F`` a prefix of the whole conversation, which is
what "the template does not rewrite earlier turns" means; the content is then searched in
``F[len(P):]`` (verbatim, or trimmed for templates that ``| trim``), and what follows it up to
trailing whitespace must be end-of-turn tokens. Where a template has generation markers the
labels equal transformers' ``return_assistant_tokens_mask`` (a test checks this), and
:func:`tokenize_dataset` takes the marked spans from one render per conversation once they
agreed with the content search on the first conversations (``_MarkerShortcut``).

Speed (``bench/bench_data.py``). Most templates only print each content, so a dataset's
renders come from a few Jinja renders, one per conversation *shape* (its roles), with the
contents filled in (``_TemplateSkeletons``; :func:`content_opaque_violation` decides, and the
first renders are checked against Jinja). The Rust tokenizer encodes a batch on a second
thread while Python renders and labels the neighbouring batches, and trained spans become
token ranges through ``char_to_token`` rather than per-token offsets.
"""

from __future__ import annotations

import functools
import itertools
import os
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from steps.packing import IGNORE_INDEX, pack_bins, pack_documents

TRUNCATION_MODES = ("drop", "turn")
TOKEN_SHARD_SCHEMA = pa.schema([
    ("input_ids", pa.list_(pa.int32())),
    ("labels", pa.list_(pa.int32())),
    ("position_ids", pa.list_(pa.int32())),
])
# Conversations per batched tokenizer call: large enough to amortise the call, small
# enough that the offsets of one batch stay a few MB.
TOKENIZE_BATCH_SIZE = 512


class ChatTemplateError(ValueError):
    """The chat template cannot give assistant-only labels for a conversation (the message says why).

    ``reason`` says whose fault it is. Problems of one conversation (the data's) are counted and
    skipped by :func:`tokenize_dataset`; problems of the template fail the step:

    - ``template_raised``: the template's own ``raise_exception`` (roles that do not alternate,
      a role it does not know) -- a conversation the template does not support;
    - ``token_joins_template_text``: the tokenizer merges the content's first or last
      characters with template text -- depends on the content;
    - ``rewrites_earlier_turns``, ``content_not_rendered``, ``end_of_turn_not_special``: the
      template itself cannot be masked reliably.
    """

    RECORD_REASONS = ("template_raised", "token_joins_template_text")

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason

    def __reduce__(self):  # so that it crosses from a worker process with its reason
        return type(self), (str(self), self.reason)


class ConversationTooLong(ValueError):
    """The rendered conversation has more tokens than allowed and cannot be (or may not be) truncated."""

    def __init__(self, num_tokens: int, max_tokens: int):
        super().__init__(f"the conversation has {num_tokens} tokens, more than max_tokens={max_tokens}")
        self.num_tokens = num_tokens
        self.max_tokens = max_tokens


class NoTrainedTokens(ValueError):
    """The conversation has no trained assistant token, so there is nothing to learn from it."""


@dataclass(frozen=True, slots=True)
class TokenizedConversation:
    input_ids: list[int]
    """Token ids of the rendered conversation, the template's own BOS (if any) included once."""
    labels: list[int]
    """``input_ids`` on trained assistant tokens, -100 everywhere else."""
    truncated: bool = False
    """True when ``truncation="turn"`` cut the conversation after its last fitting assistant turn."""

    @property
    def num_trained_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


class _TrainedSpan(NamedTuple):  # a tuple: a dataset makes one per trained turn
    """Character span of one trained assistant turn in the rendered text."""

    message_index: int
    content_start: int
    content_end: int
    end: int
    """End of the end-of-turn text (== content_end when the template has none)."""


@dataclass(frozen=True, slots=True)
class _RenderedConversation:
    text: str
    spans: list[_TrainedSpan]


# ---------------------------------------------------------------------------------------------
# Rendering


def _plain_chat(messages: Sequence[Mapping]) -> list[dict]:
    """What the template sees of each message: its role and content (not ``train``)."""
    return [{"role": message["role"], "content": message["content"]} for message in messages]


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except jinja2.TemplateError as error:
        # Templates raise_exception() on conversations they do not support (roles that
        # do not alternate, unknown roles); the template's own message says what is wrong.
        raise ChatTemplateError(f"the chat template rejected the first {len(messages)} messages: {error}",
                                "template_raised") from error


def _render_with_markers(tokenizer, template: str, chat: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and the character spans of its ``{% generation %}`` blocks."""
    from transformers.utils.chat_template_utils import render_jinja_template

    try:
        # What apply_chat_template(tokenize=False) does for plain dict messages.
        rendered, indices = render_jinja_template(conversations=[chat], chat_template=template,
                                                  return_assistant_tokens_mask=True, **tokenizer.special_tokens_map)
    except jinja2.TemplateError as error:
        raise ChatTemplateError(f"the chat template rejected the first {len(chat)} messages: {error}",
                                "template_raised") from error
    return rendered[0], [tuple(span) for span in indices[0]]


# ---------------------------------------------------------------------------------------------
# Template skeletons: the renders of a dataset without running Jinja per conversation

# Filters that look at a list or a message as a whole without reading its content.
_STRUCTURE_FILTERS = frozenset({"length", "count", "first", "last", "list", "reverse", "selectattr", "rejectattr",
                                "default", "d"})
# Filters of plain strings (a role, a literal); on a message they would print its content.
_STRING_FILTERS = frozenset({"trim", "upper", "lower", "capitalize", "title"})
# Tests that look at the type of a message, not at its content.
_TYPE_TESTS = frozenset({"defined", "undefined", "none", "string", "mapping", "sequence", "iterable", "number",
                         "integer", "float", "boolean", "true", "false"})
_STRING_METHODS = frozenset({"startswith", "endswith", "strip", "lstrip", "rstrip", "lower", "upper", "title",
                             "capitalize", "split", "replace", "get"})
_FUNCTIONS = frozenset({"raise_exception", "namespace", "range"})
# Template variables that are plain strings or booleans (transformers passes the special tokens).
_SCALAR_NAMES = frozenset({"bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token",
                           "mask_token", "add_generation_prompt", "loop"})
_EXPRESSIONS = ("Name", "Const", "Getitem", "Getattr", "Slice", "Compare", "Operand", "And", "Or", "Not", "Neg",
                "Pos", "Add", "Sub", "Mul", "Div", "FloorDiv", "Mod", "Pow", "Concat", "CondExpr", "Test", "Filter",
                "Call", "Keyword", "List", "Tuple", "NSRef", "ExtensionAttribute")
_STATEMENTS = ("Template", "Output", "TemplateData", "If", "For", "Assign", "Break", "Continue", "CallBlock")
_ALLOWED_NODES = tuple(getattr(jinja2.nodes, name) for name in _EXPRESSIONS + _STATEMENTS)


class _GenerationTag(jinja2.ext.Extension):
    """Parses ``{% generation %}...{% endgeneration %}`` (transformers' tag) so a template can be analysed."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_generation"), [], [], body).set_lineno(lineno)


def _is_content_access(node) -> bool:
    nodes = jinja2.nodes
    return ((isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const) and node.arg.value == "content")
            or (isinstance(node, nodes.Getattr) and node.attr == "content"))


def _may_be_a_message(node) -> bool:
    """Can ``node`` evaluate to a message or a list of messages (a value whose content a filter could read)?"""
    nodes = jinja2.nodes
    if isinstance(node, nodes.Name):  # a name being assigned (ctx "store") is not a value
        return node.ctx != "store" and node.name not in _SCALAR_NAMES
    if isinstance(node, nodes.Getitem):  # messages[0], messages[1:], messages[i]; message['role'] is a string
        return not (isinstance(node.arg, nodes.Const) and isinstance(node.arg.value, str))
    if isinstance(node, nodes.Getattr):  # loop.previtem / loop.nextitem are messages
        return node.attr in ("previtem", "nextitem")
    return isinstance(node, nodes.Filter) and node.name in _STRUCTURE_FILTERS - {"length", "count"}


def content_opaque_violation(template: str) -> str | None:
    """Why the output of ``template`` may depend on a message's content other than by printing it, or None.

    A template passes when each ``message['content']`` is only printed, alone or joined with
    ``+``/``~``, and nothing else reads it: no filter (``| trim``), test, comparison, method,
    assignment, or loop touches the content, nor a whole message or message list through
    anything that could read its content (``tojson``, ``string``, ``items()``). For such a
    template, the rendering of a conversation is the rendering of its roles with each content
    put in its place, which is what :class:`_TemplateSkeletons` relies on. The check is
    deliberately narrow (an unknown construct fails it): a template that fails is rendered by
    Jinja as usual.

        >>> content_opaque_violation("{% for m in messages %}{{ m['role'] + ': ' + m['content'] }}{% endfor %}")
        >>> content_opaque_violation("{% for m in messages %}{{ m['content'] | trim }}{% endfor %}")
        "'content' is used by Filter, not only printed"
    """
    nodes = jinja2.nodes
    environment = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    try:
        tree = environment.parse(template)
    except jinja2.TemplateError as error:
        return f"the template does not parse: {error}"

    def visit(node, parent, field: str) -> str | None:
        if not isinstance(node, _ALLOWED_NODES):
            return f"{type(node).__name__} is not analysed"
        if isinstance(node, nodes.CallBlock) and not isinstance(node.call.node, nodes.ExtensionAttribute):
            return "call blocks are not analysed"
        if _is_content_access(node):
            chain_parent, depth = parent, len(path) - 1  # path[-1] is the parent
            while isinstance(chain_parent, (nodes.Add, nodes.Concat)):  # the content may be joined by + or ~
                depth -= 1
                chain_parent = path[depth]
            if not isinstance(chain_parent, nodes.Output):
                return f"'content' is used by {type(chain_parent).__name__}, not only printed"
        elif isinstance(node, nodes.Const) and node.value == "content" and not (
                isinstance(parent, nodes.Getitem) and field == "arg"):
            return f"'content' is named by {type(parent).__name__}"
        if _may_be_a_message(node):
            allowed = ((isinstance(parent, (nodes.Getitem, nodes.Getattr, nodes.Call)) and field == "node")
                       or (isinstance(parent, nodes.For) and field == "iter")
                       or (isinstance(parent, nodes.Assign) and field == "node"
                           and isinstance(parent.target, nodes.Name))
                       or (isinstance(parent, nodes.Filter) and field == "node" and parent.name in _STRUCTURE_FILTERS)
                       or (isinstance(parent, nodes.Test) and field == "node" and parent.name in _TYPE_TESTS)
                       or (isinstance(parent, (nodes.If, nodes.CondExpr, nodes.For)) and field == "test")
                       or isinstance(parent, (nodes.Not, nodes.And, nodes.Or)))
            if not allowed:
                return f"a message (or list of them) may reach {type(parent).__name__}"
        if isinstance(node, nodes.Filter) and node.name not in _STRUCTURE_FILTERS | _STRING_FILTERS:
            return f"filter {node.name!r} is not analysed"
        if isinstance(node, nodes.Test) and node.name not in _TYPE_TESTS and _may_be_a_message(node.node):
            return f"test {node.name!r} on a message is not analysed"
        if isinstance(node, nodes.Call):
            if node.dyn_args is not None or node.dyn_kwargs is not None:
                return "calls with *args or **kwargs are not analysed"
            function = node.node
            if isinstance(function, nodes.Name):
                if function.name not in _FUNCTIONS:
                    return f"function {function.name!r} is not analysed"
            elif isinstance(function, nodes.Getattr):
                if function.attr not in _STRING_METHODS:
                    return f"method {function.attr!r} is not analysed"
                if function.attr == "get" and not all(isinstance(arg, nodes.Const) for arg in node.args):
                    return "get() with a computed key is not analysed"
            elif not isinstance(function, nodes.ExtensionAttribute):
                return f"calls of {type(function).__name__} are not analysed"
        path.append(node)
        for child_field in node.fields:
            value = getattr(node, child_field)
            for child in value if isinstance(value, list) else [value]:
                if isinstance(child, nodes.Node):
                    problem = visit(child, node, child_field)
                    if problem:
                        return problem
        path.pop()
        return None

    path: list = []
    return visit(tree, None, "")


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


class _EndOfTurnCheck:
    """Is a text only control tokens and whitespace (``"<|im_end|>"``, ``" </s>"``, ``"\\n"``)?

    Answers are remembered: nearly every turn of a dataset ends with the same text, and a
    tokenizer can have thousands of added tokens to look through.
    """

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self._control_tokens: list[str] | None = None
        self._answers: dict[str, bool] = {}

    def __call__(self, text: str) -> bool:
        if not text.strip():
            return True
        if text not in self._answers:
            if self._control_tokens is None:
                tokens = set(getattr(self._tokenizer, "added_tokens_encoder", {}) or {})
                tokens.update(token for token in getattr(self._tokenizer, "all_special_tokens", []) if token)
                # Longest first: a control token may contain a shorter one.
                self._control_tokens = sorted(tokens, key=len, reverse=True)
            remainder = text
            for token in self._control_tokens:
                if token in remainder:
                    remainder = remainder.replace(token, "")
            self._answers[text] = not remainder.strip()
        return self._answers[text]


def _prompt_end(render: Callable[[list[dict], bool], str], chat: list[dict], index: int, turn_text: str) -> int:
    """Where the text of assistant message ``index`` starts in ``turn_text``, the rendering of ``chat[:index+1]``."""
    if index == 0:
        # Nothing to render before it (templates cannot render zero messages); any default
        # system prompt or BOS ahead of the content is simply not trained.
        return 0
    prompt = render(chat[:index], True)
    if turn_text.startswith(prompt):
        return len(prompt)
    # Some templates end the generation prompt with whitespace that the rendered turn does
    # not have (or has as part of the content's first token).
    if turn_text.startswith(prompt.rstrip()):
        return len(prompt.rstrip())
    # Some generation prompts add text that a finished turn does not have (e.g. an opened
    # "<think>"); the header is then searched past the plain rendering of the earlier turns.
    prompt = render(chat[:index], False)
    if turn_text.startswith(prompt):
        return len(prompt)
    raise ChatTemplateError(
        f"chat template rewrites earlier turns: the rendering of the first {index} messages is not a prefix "
        f"of the full conversation (it changes once assistant message {index} follows)", "rewrites_earlier_turns")


def _render_conversation(tokenizer, messages: Sequence[Mapping], is_end_of_turn: _EndOfTurnCheck | None = None,
                         render: Callable[[list[dict], bool], str] | None = None) -> _RenderedConversation:
    """The rendered text and the trained spans of ``messages``, found by the content search (module docstring).

    ``render(chat, add_generation_prompt)`` renders a prefix of the chat: the template itself by
    default, or :class:`_TemplateSkeletons`, which gives the same text without running Jinja.
    """
    render = render or functools.partial(_render, tokenizer)
    chat = _plain_chat(messages)
    text = render(chat, False)
    is_end_of_turn = is_end_of_turn or _EndOfTurnCheck(tokenizer)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant" or message.get("train") is False:
            continue
        turn_text = text if index == len(chat) - 1 else render(chat[: index + 1], False)
        if not text.startswith(turn_text):
            raise ChatTemplateError(
                f"chat template rewrites earlier turns: the rendering of the first {index + 1} messages is not a "
                f"prefix of the full conversation ({len(chat)} messages)", "rewrites_earlier_turns")
        search_start = _prompt_end(render, chat, index, turn_text)
        span = _find_content(turn_text, search_start, message["content"], is_end_of_turn)
        if span is None:
            rendered_turn = turn_text[search_start:]
            if message["content"].strip() in rendered_turn:
                reason = "end_of_turn_not_special"
                problem = ("what follows its content is not end-of-turn text (the tokenizer's special or added "
                           "tokens, and whitespace)")
            else:
                reason = "content_not_rendered"
                problem = "the chat template does not render its content verbatim (nor trimmed)"
            raise ChatTemplateError(f"assistant message {index}: {problem}; rendered turn: {rendered_turn!r}", reason)
        spans.append(_TrainedSpan(index, *span))
    return _RenderedConversation(text, spans)


class _MarkerShortcut:
    """One render per conversation for templates with ``{% generation %}`` markers, once proven.

    :func:`_render_conversation` renders every trained turn's prefixes (up to three renders
    per turn) to find its text. Where the template marks the assistant's text itself, one
    render gives every span (what ``return_assistant_tokens_mask`` uses). The marked spans
    are used only after they gave the same trained characters as the content search on the
    first ``NUM_CHECKED`` conversations of this process; one disagreement (say, markers that
    leave the end-of-turn token out) and the content search is used for everything.
    """

    NUM_CHECKED = 64

    def __init__(self, tokenizer, skeletons: _TemplateSkeletons | None = None):
        try:
            template = tokenizer.get_chat_template()
        except (ValueError, TypeError):
            template = None
        self.template = template
        self.enabled = bool(template) and re.search(r"\{%-?\s*generation\s*-?%\}", template) is not None
        self.num_agreed = 0
        self.skeletons = skeletons
        """Renders without Jinja where the template allows it (None: Jinja renders everything)."""

    def _render_marked(self, tokenizer, messages: Sequence[Mapping]) -> _RenderedConversation | None:
        if self.skeletons is not None:
            text, indices = self.skeletons.render_marked(messages)
        else:
            text, indices = _render_with_markers(tokenizer, self.template, _plain_chat(messages))
        assistant_indices = [i for i, message in enumerate(messages) if message["role"] == "assistant"]
        if len(indices) != len(assistant_indices):
            return None  # blocks and assistant turns do not pair up: let the content search decide
        spans = [_TrainedSpan(index, start, end, end) for index, (start, end) in zip(assistant_indices, indices)
                 if messages[index].get("train") is not False]
        return _RenderedConversation(text, spans)

    def render(self, tokenizer, messages: Sequence[Mapping], is_end_of_turn: _EndOfTurnCheck) -> _RenderedConversation:
        render = self.skeletons.render if self.skeletons is not None else None
        if not self.enabled:
            return _render_conversation(tokenizer, messages, is_end_of_turn, render=render)
        marked = self._render_marked(tokenizer, messages)
        if marked is not None and self.num_agreed >= self.NUM_CHECKED:
            return marked
        searched = _render_conversation(tokenizer, messages, is_end_of_turn, render=render)
        if marked is not None and searched.spans:
            def trained_characters(rendered):
                return rendered.text, [(span.message_index, span.content_start, span.end) for span in rendered.spans]

            if trained_characters(marked) == trained_characters(searched):
                self.num_agreed += 1
            else:
                self.enabled = False
        return searched


def _find_content(turn_text: str, search_start: int, content: str,
                  is_end_of_turn: _EndOfTurnCheck) -> tuple[int, int, int] | None:
    """``(content_start, content_end, end)`` of the content in ``turn_text[search_start:]``.

    The first occurrence that is followed only by end-of-turn text wins: an earlier match
    inside the header (content "assistant") is followed by the content itself, so it loses.
    """
    for candidate in dict.fromkeys((content, content.strip())):  # verbatim first, then `| trim`
        start = turn_text.find(candidate, search_start)
        while start != -1:
            content_end = start + len(candidate)
            end_of_turn = turn_text[content_end:].rstrip()
            if is_end_of_turn(end_of_turn):
                return start, content_end, content_end + len(end_of_turn)
            start = turn_text.find(candidate, start + 1)
    return None


# ---------------------------------------------------------------------------------------------
# Labels


def _span_tokens(encoding, start: int, end: int) -> range:
    """Indices of the tokens whose characters overlap ``[start, end)`` (empty if none).

    The Rust tokenizer finds the tokens of the span's first and last characters
    (``char_to_token``), so no per-token offset becomes a Python object; the range then grows
    over neighbours that still overlap (a character split over two byte-level tokens). Where a
    boundary character is in no token (whitespace a pre-tokenizer drops), every offset is
    looked at instead.
    """
    first = encoding.char_to_token(start)
    last = encoding.char_to_token(end - 1) if end > start else None
    if first is None or last is None:
        bounds = np.asarray(encoding.offsets, dtype=np.int64).reshape(-1, 2)
        overlap = np.flatnonzero((bounds[:, 0] < end) & (bounds[:, 1] > start))
        return range(int(overlap[0]), int(overlap[-1]) + 1) if overlap.size else range(0)
    # char_to_token gives the first token holding a character, so tokens in text order cannot
    # overlap the span before `first`; after `last`, more tokens may hold the same character.
    num_tokens = len(encoding)
    while last + 1 < num_tokens:
        token_start, token_end = encoding.token_to_chars(last + 1)
        if not (token_start < end and token_end > start):
            break
        last += 1
    return range(first, last + 1)


def _tokens_reaching_outside(encoding, tokens: range, start: int, end: int) -> list[int]:
    """The tokens of ``tokens`` (in text order) that start before ``start`` or end after ``end``: a few at the edges."""
    reaching = []
    for index in tokens:
        if encoding.token_to_chars(index)[0] >= start:
            break
        reaching.append(index)
    for index in reversed(tokens):
        if encoding.token_to_chars(index)[1] <= end:
            break
        if index not in reaching:
            reaching.append(index)
    return reaching


def _trained_mask(rendered: _RenderedConversation, encoding, tokenizer) -> tuple[np.ndarray, list[int]]:
    """Which tokens of ``encoding`` (a ``tokenizers.Encoding``) are trained, and the token index past each trained turn.

    A token is trained when its characters overlap a trained span. A token may reach
    outside the span only over whitespace (SentencePiece's "▁Hello" after "[/INST] "): the
    model does produce that token when it answers. A token that merges non-blank template
    text with the content would make the content untrainable on its own, so it is an error.
    """
    text = rendered.text
    trained = np.zeros(len(encoding), dtype=bool)
    turn_token_ends = []
    for span in rendered.spans:
        tokens = _span_tokens(encoding, span.content_start, span.end)
        if not tokens:
            continue
        for token_index in _tokens_reaching_outside(encoding, tokens, span.content_start, span.end):
            start, end = encoding.token_to_chars(token_index)
            outside = text[start:span.content_start] + text[span.end:end]
            if outside.strip():
                raise ChatTemplateError(
                    f"assistant message {span.message_index}: token "
                    f"{tokenizer.convert_ids_to_tokens(encoding.ids[token_index])!r} (characters {start}:{end}) "
                    f"joins the template's text {outside!r} to the trained turn, so the turn cannot be trained "
                    f"on its own tokens", "token_joins_template_text")
        trained[tokens.start:tokens.stop] = True
        turn_token_ends.append(tokens.stop)
    return trained, turn_token_ends


def _limit_length(num_tokens: int, turn_token_ends: list[int], max_tokens: int | None, truncation: str) -> int:
    """The number of tokens to keep, or raise ``NoTrainedTokens`` / ``ConversationTooLong``.

    ``turn_token_ends`` has one entry per trained turn with at least one token (:func:`_trained_mask`).
    """
    if not turn_token_ends:
        raise NoTrainedTokens("the conversation has no trained assistant token")
    if max_tokens is None or num_tokens <= max_tokens:
        return num_tokens
    if truncation == "turn":
        fitting = [end for end in turn_token_ends if end <= max_tokens]
        if fitting:
            return fitting[-1]
    raise ConversationTooLong(num_tokens, max_tokens)


def _check_tokenizer(tokenizer, truncation: str) -> None:
    if truncation not in TRUNCATION_MODES:
        raise ValueError(f"truncation must be one of {TRUNCATION_MODES}, got {truncation!r}")
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"{type(tokenizer).__name__} is not a fast tokenizer; assistant labels need its "
                         f"offset mapping")


def _encode(tokenizer, texts: list[str]) -> list:
    """The ``tokenizers.Encoding`` of each text, no special tokens added: BOS comes from the template.

    The same tokens as ``tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)``
    (a test compares with ``apply_chat_template(tokenize=True)``), straight from the Rust
    tokenizer: converting its encodings to a ``BatchEncoding`` (every offset a Python tuple)
    costs as much as encoding, so offsets are asked for only where a span needs them.
    """
    return tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)


def tokenize_conversation(tokenizer, messages: Sequence[Mapping], max_tokens: int | None = None,
                          truncation: str = "drop") -> TokenizedConversation:
    """Render ``messages`` with the tokenizer's chat template and label the trained assistant turns.

    Messages are ``{"role", "content", "train"}`` dicts; ``train: False`` on an assistant turn
    keeps it as context only, and only role and content reach the template. The text is
    tokenized once without adding special tokens: a BOS comes from the template or not at all.

    Example (Llama-3-style template, ``train: False`` on the first answer; ``-`` = -100)::

        messages  user "Hi" | assistant "Hello!" (train False) | user "Bye" | assistant "Bye!"
        text      <|begin_of_text|><|start_header_id|>user<|end_header_id|>\\n\\nHi<|eot_id|>
                  <|start_header_id|>assistant<|end_header_id|>\\n\\nHello!<|eot_id|>
                  <|start_header_id|>user<|end_header_id|>\\n\\nBye<|eot_id|>
                  <|start_header_id|>assistant<|end_header_id|>\\n\\nBye!<|eot_id|>
        labels    -100 on every token of the first three messages (one BOS, from the template), then
        tokens    <|start_header_id|> assistant <|end_header_id|> \\n\\n Bye ! <|eot_id|>
        labels    -                   -         -                 -    Bye ! <|eot_id|>

    Args:
        max_tokens: longest allowed conversation; ``None`` for no limit.
        truncation: what to do with a longer one: ``"drop"`` raises ``ConversationTooLong``;
            ``"turn"`` cuts it after the last trained assistant turn that fits (its
            end-of-turn token included) and raises ``ConversationTooLong`` if none fits.

    Raises:
        NoTrainedTokens: no assistant turn is trained (or none renders to a token).
        ConversationTooLong: see ``truncation``.
        ChatTemplateError: the template rejects the conversation, rewrites earlier turns,
            does not render an assistant content verbatim, or the tokenizer merges template
            text into a trained turn's tokens.
    """
    _check_tokenizer(tokenizer, truncation)
    rendered = _render_conversation(tokenizer, messages)
    (encoding,) = _encode(tokenizer, [rendered.text])
    input_ids = encoding.ids
    trained, turn_token_ends = _trained_mask(rendered, encoding, tokenizer)
    num_kept = _limit_length(len(input_ids), turn_token_ends, max_tokens, truncation)
    labels = [token if is_trained else IGNORE_INDEX for token, is_trained in zip(input_ids, trained.tolist())]
    return TokenizedConversation(input_ids[:num_kept], labels[:num_kept], truncated=num_kept < len(input_ids))


def example_masked_text(tokenizer, input_ids: Sequence[int], labels: Sequence[int]) -> str:
    """Decode a tokenized conversation with the trained runs wrapped in ``[[ ]]``.

    Example (ChatML)::

        <|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n[[Hello!<|im_end|>]]\\n
    """
    if len(input_ids) != len(labels):
        raise ValueError(f"{len(input_ids)} input_ids but {len(labels)} labels")
    pieces = []
    run_start = 0
    for index in range(1, len(input_ids) + 1):
        if index < len(input_ids) and (labels[index] != IGNORE_INDEX) == (labels[run_start] != IGNORE_INDEX):
            continue
        text = tokenizer.decode(list(input_ids[run_start:index]), skip_special_tokens=False,
                                clean_up_tokenization_spaces=False)
        pieces.append(f"[[{text}]]" if labels[run_start] != IGNORE_INDEX else text)
        run_start = index
    return "".join(pieces)


# ---------------------------------------------------------------------------------------------
# Datasets


def _int32_array(values: np.ndarray) -> pa.Array:
    # Wraps the numpy buffer as it is; pa.array() would first import pandas (a second, once).
    values = np.ascontiguousarray(values, dtype=np.int32)
    return pa.Array.from_buffers(pa.int32(), len(values), [None, pa.py_buffer(values)])


def _write_token_shard(path: Path, flat: Mapping[str, np.ndarray], row_lengths: np.ndarray) -> None:
    """Write rows given as flat columns and row lengths (``steps.packing.pack_bins``) as one Parquet file."""
    offsets = _int32_array(np.concatenate([[0], np.cumsum(row_lengths)]))
    table = pa.Table.from_arrays([pa.ListArray.from_arrays(offsets, _int32_array(flat[name]))
                                  for name in TOKEN_SHARD_SCHEMA.names], schema=TOKEN_SHARD_SCHEMA)
    staging = path.with_name(f".{path.name}.writing-{os.getpid()}")
    pq.write_table(table, staging)
    os.replace(staging, path)  # a reader never sees half a shard


def _render_batch(settings: tuple, conversations: list) -> tuple[list, list[int], list[_RenderedConversation]]:
    """Render a batch: ``(outcomes, positions, rendered)``, ``rendered[k]`` for conversation ``positions[k]``.

    ``outcomes`` already holds the ``ChatTemplateError`` of each conversation that failed to render.
    """
    tokenizer, is_end_of_turn, shortcut, _, _ = settings
    outcomes: list = [None] * len(conversations)
    rendered, positions = [], []
    for position, messages in enumerate(conversations):
        try:
            rendered.append(shortcut.render(tokenizer, messages, is_end_of_turn))
            positions.append(position)
        except ChatTemplateError as error:
            outcomes[position] = error
    return outcomes, positions, rendered


def _label_rendered(settings: tuple, outcomes: list, positions: list[int], rendered: list[_RenderedConversation],
                    encodings: list) -> list:
    """Fill ``outcomes`` (see :func:`_label_batch`) from the encodings of the rendered conversations."""
    tokenizer, _, _, max_seq_tokens, truncation = settings
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


def _label_batch(settings: tuple, conversations: list) -> list:
    """Render, tokenize (one call) and label a batch; one outcome per conversation, in order.

    An outcome is ``(input_ids int32 array, trained bool array, truncated)``, ``"no_trained_tokens"``,
    ``"too_long"``, or the ``ChatTemplateError`` (the caller decides whose fault it is).
    """
    outcomes, positions, rendered = _render_batch(settings, conversations)
    encodings = _encode(settings[0], [item.text for item in rendered]) if rendered else []
    return _label_rendered(settings, outcomes, positions, rendered, encodings)


_WORKER_SETTINGS: tuple | None = None


def _init_worker(settings: tuple) -> None:
    global _WORKER_SETTINGS
    _WORKER_SETTINGS = settings


def _label_batch_in_worker(job: tuple) -> tuple:
    uri, record_ids, conversations = job
    return uri, record_ids, _label_batch(_WORKER_SETTINGS, conversations)


class _BatchLabeller:
    """Runs :func:`_label_batch` over batches, in this process or in a pool, results in input order.

    In this process, the Rust tokenizer encodes one batch on a thread while Python renders the
    next and labels the previous one. With workers, at most ``4 * num_workers`` batches are in
    flight, so memory does not grow with the dataset; the results (and so the rows) are the same
    for any number of workers.
    """

    def __init__(self, settings: tuple, num_workers: int):
        self.settings, self.num_workers = settings, num_workers
        self.pool = None

    def _run_with_encoding_thread(self, jobs):
        """One process: the Rust tokenizer encodes batch k on a thread (it releases the GIL) while
        Python renders batch k+1 and labels batch k-1, so a second core is used without pickling."""
        from concurrent.futures import ThreadPoolExecutor

        tokenizer = self.settings[0]
        pending = None
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="encode") as encoder:
            for uri, record_ids, conversations in jobs:
                outcomes, positions, rendered = _render_batch(self.settings, conversations)
                encoded = encoder.submit(_encode, tokenizer, [item.text for item in rendered])
                if pending is not None:
                    yield self._finish(*pending)
                pending = (uri, record_ids, outcomes, positions, rendered, encoded)
            if pending is not None:
                yield self._finish(*pending)

    def _finish(self, uri, record_ids, outcomes, positions, rendered, encoded) -> tuple:
        return uri, record_ids, _label_rendered(self.settings, outcomes, positions, rendered, encoded.result())

    def __enter__(self) -> _BatchLabeller:
        if self.num_workers > 1:
            import multiprocessing

            self.pool = multiprocessing.get_context("fork" if os.name == "posix" else "spawn").Pool(
                self.num_workers, initializer=_init_worker, initargs=(self.settings,))
        return self

    def __exit__(self, *exc_info) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()

    def run(self, jobs):
        if self.pool is None:
            yield from self._run_with_encoding_thread(jobs)
            return
        window = []
        for job in jobs:
            window.append(job)
            if len(window) == 4 * self.num_workers:
                yield from self.pool.map(_label_batch_in_worker, window, chunksize=1)
                window = []
        if window:
            yield from self.pool.map(_label_batch_in_worker, window, chunksize=1)


def tokenize_dataset(tokenizer, data_uris: Sequence[str], out_dir: Path, *, max_seq_tokens: int, truncation: str,
                     rows_per_shard: int = 20000, max_reject_fraction: float = 0.0, num_workers: int = 1) -> dict:
    """Tokenize the conversations of data shards, pack them into rows, and write token shards.

    Each conversation goes through the same rendering and labelling as
    :func:`tokenize_conversation` (the text of a batch is tokenized in one call). Those
    longer than ``max_seq_tokens`` are dropped or cut per ``truncation``, those without a
    trained token are dropped, those the template cannot handle (``ChatTemplateError.reason``
    in ``RECORD_REASONS``, e.g. roles that do not alternate) are counted by reason, and the
    rest are packed into rows of at most ``max_seq_tokens`` (best fit decreasing plus a refill
    pass, see ``steps.packing.pack_documents``). Rows go to
    ``out_dir/part-00000.parquet, ...`` (``input_ids``, ``labels``, ``position_ids``: int32
    lists, not padded), ``rows_per_shard`` rows each. The same inputs always give the same rows,
    with any ``num_workers`` (processes that render and label batches; packing is in this one).

    Returns:
        ``{"uris", "num_conversations" (read), "num_packed_conversations", "num_rows",
        "num_tokens" (real tokens), "num_trained_tokens", "num_truncated", "num_dropped_too_long",
        "num_no_trained_tokens", "num_template_rejects", "template_reject_reasons" ({reason: count}),
        "packing_efficiency" (num_tokens / (num_rows * max_seq_tokens)), "max_seq_tokens"}``,
        for example (the default recipe's train split: builtin catalog chats, 256-token rows)::

            {"uris": [".../part-00000.parquet"], "num_conversations": 10708, "num_packed_conversations": 10708,
             "num_rows": 2697, "num_tokens": 681159, ..., "packing_efficiency": 0.987, "max_seq_tokens": 256}

    Raises:
        ChatTemplateError: the template itself cannot be masked (naming the shard and record
            id, as for :func:`tokenize_conversation`), or it rejects more than
            ``max_reject_fraction`` of the conversations (naming the reasons and the first).
    """
    _check_tokenizer(tokenizer, truncation)
    if max_seq_tokens < 1 or rows_per_shard < 1 or num_workers < 1:
        raise ValueError(f"max_seq_tokens, rows_per_shard and num_workers must be >= 1, got {max_seq_tokens}, "
                         f"{rows_per_shard}, {num_workers}")
    doc_input_ids: list[np.ndarray] = []
    doc_trained: list[np.ndarray] = []
    counts = {"num_conversations": 0, "num_truncated": 0, "num_dropped_too_long": 0, "num_no_trained_tokens": 0}
    template_rejects: Counter[str] = Counter()
    first_template_reject = ""

    def batches():
        for uri in data_uris:
            # Batches of a shard, not the whole shard: memory holds a few batches of
            # conversations plus the token arrays of the documents kept so far.
            for batch in pq.ParquetFile(uri).iter_batches(batch_size=TOKENIZE_BATCH_SIZE, columns=["id", "messages"]):
                yield uri, batch.column("id").to_pylist(), batch.column("messages").to_pylist()

    settings = (tokenizer, _EndOfTurnCheck(tokenizer), _MarkerShortcut(tokenizer, _TemplateSkeletons(tokenizer)),
                max_seq_tokens, truncation)
    with _BatchLabeller(settings, num_workers) as labeller:
        for uri, record_ids, outcomes in labeller.run(batches()):
            for record_id, outcome in zip(record_ids, outcomes):
                counts["num_conversations"] += 1
                if isinstance(outcome, ChatTemplateError):
                    # Problems of one conversation are counted; a template that cannot be masked fails the step.
                    if outcome.reason not in ChatTemplateError.RECORD_REASONS:
                        raise ChatTemplateError(f"{uri}, record {record_id}: {outcome}", outcome.reason) from outcome
                    template_rejects[outcome.reason] += 1
                    first_template_reject = first_template_reject or f"{uri}, record {record_id}: {outcome}"
                elif outcome == "no_trained_tokens":
                    counts["num_no_trained_tokens"] += 1
                elif outcome == "too_long":
                    counts["num_dropped_too_long"] += 1
                else:
                    input_ids, trained, truncated = outcome
                    counts["num_truncated"] += truncated
                    doc_input_ids.append(input_ids)
                    doc_trained.append(trained)

    num_template_rejects = sum(template_rejects.values())
    if num_template_rejects > max_reject_fraction * counts["num_conversations"]:
        reasons = ", ".join(f"{reason}: {n}" for reason, n in template_rejects.most_common())
        raise ChatTemplateError(
            f"the chat template rejected {num_template_rejects} of {counts['num_conversations']} conversations "
            f"({reasons}), more than max_reject_fraction={max_reject_fraction}; the first: {first_template_reject}",
            template_rejects.most_common(1)[0][0])
    bins = pack_documents([len(ids) for ids in doc_input_ids], max_seq_tokens)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob("part-*.parquet"):  # a retried step must not leave an earlier attempt's shards
        stale.unlink()
    uris = []
    num_tokens = num_trained_tokens = 0
    # One shard even when there is no row, so readers always find the schema.
    for shard_index, shard_start in enumerate(range(0, max(len(bins), 1), rows_per_shard)):
        flat, row_lengths = pack_bins(bins[shard_start: shard_start + rows_per_shard],
                                      {"input_ids": doc_input_ids, "trained": doc_trained})
        trained = flat.pop("trained").astype(bool)
        flat["labels"] = np.where(trained, flat["input_ids"], IGNORE_INDEX).astype(np.int32)
        num_tokens += len(trained)
        num_trained_tokens += int(trained.sum())
        path = out_dir / f"part-{shard_index:05d}.parquet"
        _write_token_shard(path, flat, row_lengths)
        uris.append(str(path))

    return {
        "uris": uris,
        **counts,
        "num_template_rejects": num_template_rejects,
        "template_reject_reasons": dict(sorted(template_rejects.items())),
        "num_packed_conversations": len(doc_input_ids),
        "num_rows": len(bins),
        "num_tokens": num_tokens,
        "num_trained_tokens": num_trained_tokens,
        "packing_efficiency": num_tokens / (len(bins) * max_seq_tokens) if bins else 0.0,
        "max_seq_tokens": max_seq_tokens,
    }


def tokenize_splits(recipe, base_model: str | Path, dataset_manifest: dict, run_root: str) -> dict:
    """The tokenize step: token shards for every split under ``<run_root>/tokens/<split>/``.

    Returns ``{"train": stats, "eval": stats, "packing_efficiency": train's, "example": str}``
    where each ``stats`` is :func:`tokenize_dataset`'s and ``example`` is one training
    conversation with its trained tokens wrapped in ``[[ ]]``.
    """
    from steps.models import load_tokenizer
    from steps.storage import subdir

    tokenizer = load_tokenizer(base_model, recipe.model.trust_remote_code)
    stats = {}
    for split, info in dataset_manifest["splits"].items():
        stats[split] = tokenize_dataset(tokenizer, info["uris"], subdir(run_root, "tokens", split),
                                        max_seq_tokens=recipe.tokenize.max_seq_tokens,
                                        truncation=recipe.tokenize.truncation,
                                        max_reject_fraction=recipe.tokenize.max_reject_fraction,
                                        num_workers=recipe.tokenize.num_workers or os.cpu_count() or 1)
        print(f"tokenize {split}: {stats[split]['num_packed_conversations']} conversations -> "
              f"{stats[split]['num_rows']} rows, packing efficiency {stats[split]['packing_efficiency']:.3f}")
    if stats["train"]["num_rows"] == 0:
        raise ValueError("no training conversation survived tokenization: "
                         f"{stats['train']['num_dropped_too_long']} too long for tokenize.max_seq_tokens="
                         f"{recipe.tokenize.max_seq_tokens}, {stats['train']['num_no_trained_tokens']} "
                         "without a trained token")
    first = pq.read_table(stats["train"]["uris"][0], columns=["input_ids", "labels", "position_ids"]).slice(0, 1)
    row = first.to_pylist()[0]
    doc_end = next((i for i, p in enumerate(row["position_ids"][1:], 1) if p == 0), len(row["input_ids"]))
    stats["example"] = example_masked_text(tokenizer, row["input_ids"][:doc_end], row["labels"][:doc_end])
    stats["packing_efficiency"] = stats["train"]["packing_efficiency"]
    return stats
