"""Template analysis and masking: one conversation -> ``input_ids`` and assistant-only ``labels``.

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
labels equal transformers' ``return_assistant_tokens_mask`` (a test checks this).

This module also analyses a template's Jinja syntax tree (:func:`content_opaque_violation`:
does it only print each content?), which lets ``steps.chat.renderer`` render a dataset from a
few Jinja renders; ``steps.chat.writer`` labels whole datasets in batches with the same
functions as :func:`tokenize_conversation`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox
import numpy as np

from steps.packing import IGNORE_INDEX

TRUNCATION_MODES = ("drop", "turn")


class ChatTemplateError(ValueError):
    """The chat template cannot give assistant-only labels for a conversation (the message says why).

    ``reason`` says whose fault it is. Problems of one conversation (the data's) are counted and
    skipped by the dataset writer (``steps.chat.writer``); problems of the template fail the step:

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


def marked_template(tokenizer) -> str | None:
    """The tokenizer's chat template if it has ``{% generation %}`` markers, else None."""
    import re

    try:
        template = tokenizer.get_chat_template()
    except (ValueError, TypeError):
        return None
    return template if template and re.search(r"\{%-?\s*generation\s*-?%\}", template) else None


def marked_conversation(messages: Sequence[Mapping], text: str, indices: list[tuple[int, int]]
                        ) -> _RenderedConversation | None:
    """The trained spans the ``{% generation %}`` blocks mark (None when blocks and assistant turns
    do not pair up one to one)."""
    assistant_indices = [i for i, message in enumerate(messages) if message["role"] == "assistant"]
    if len(indices) != len(assistant_indices):
        return None
    return _RenderedConversation(text, [_TrainedSpan(index, start, end, end)
                                        for index, (start, end) in zip(assistant_indices, indices)
                                        if messages[index].get("train") is not False])


def markers_cover(marked: _RenderedConversation | None, searched: _RenderedConversation) -> bool:
    """Whether the marked spans cover each trained content *and* its end-of-turn text, as the
    content search found them: then the markers decide the labels (transformers'
    ``return_assistant_tokens_mask``), a leading space or a role header inside them included.
    Markers that leave the end-of-turn token out do not cover it: the content search decides, or
    the model would never learn to stop.

        >>> searched = _RenderedConversation("[INST] Hi [/INST] Hello</s>", [_TrainedSpan(1, 18, 23, 27)])
        >>> markers_cover(_RenderedConversation(searched.text, [_TrainedSpan(1, 17, 27, 27)]), searched)
        True
        >>> markers_cover(_RenderedConversation(searched.text, [_TrainedSpan(1, 17, 23, 23)]), searched)
        False
    """
    if marked is None or marked.text != searched.text or len(marked.spans) != len(searched.spans):
        return False
    return all(m.message_index == s.message_index and m.content_start <= s.content_start and m.end >= s.end
               for m, s in zip(marked.spans, searched.spans))


def _render_following_markers(tokenizer, messages: Sequence[Mapping]) -> _RenderedConversation:
    """:func:`_render_conversation`, with the ``{% generation %}`` spans instead wherever they
    cover the contents and their end-of-turn text (:func:`markers_cover`)."""
    searched = _render_conversation(tokenizer, messages)
    template = marked_template(tokenizer)
    if template is None or not searched.spans:
        return searched
    marked = marked_conversation(messages, *_render_with_markers(tokenizer, template, _plain_chat(messages)))
    return marked if markers_cover(marked, searched) else searched


# ---------------------------------------------------------------------------------------------
# Template analysis: does a template only print each content? (the renderer's skeletons need it)

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
    put in its place, which is what ``steps.chat.renderer._TemplateSkeletons`` relies on. The check is
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



# ---------------------------------------------------------------------------------------------
# Masking: the trained spans of a rendered conversation (the content search)


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
    default, or ``steps.chat.renderer._TemplateSkeletons``, which gives the same text without running Jinja.
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
    rendered = _render_following_markers(tokenizer, messages)
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


