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
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import jinja2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from steps.packing import IGNORE_INDEX, pack_documents, pack_row

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


@dataclass(frozen=True, slots=True)
class _TrainedSpan:
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


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except jinja2.TemplateError as error:
        # Templates raise_exception() on conversations they do not support (roles that
        # do not alternate, unknown roles); the template's own message says what is wrong.
        raise ChatTemplateError(f"the chat template rejected the first {len(messages)} messages: {error}",
                                "template_raised") from error


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


def _prompt_end(tokenizer, chat: list[dict], index: int, turn_text: str) -> int:
    """Where the text of assistant message ``index`` starts in ``turn_text``, the rendering of ``chat[:index+1]``."""
    if index == 0:
        # Nothing to render before it (templates cannot render zero messages); any default
        # system prompt or BOS ahead of the content is simply not trained.
        return 0
    prompt = _render(tokenizer, chat[:index], add_generation_prompt=True)
    if turn_text.startswith(prompt):
        return len(prompt)
    # Some templates end the generation prompt with whitespace that the rendered turn does
    # not have (or has as part of the content's first token).
    if turn_text.startswith(prompt.rstrip()):
        return len(prompt.rstrip())
    # Some generation prompts add text that a finished turn does not have (e.g. an opened
    # "<think>"); the header is then searched past the plain rendering of the earlier turns.
    prompt = _render(tokenizer, chat[:index])
    if turn_text.startswith(prompt):
        return len(prompt)
    raise ChatTemplateError(
        f"chat template rewrites earlier turns: the rendering of the first {index} messages is not a prefix "
        f"of the full conversation (it changes once assistant message {index} follows)", "rewrites_earlier_turns")


def _render_conversation(tokenizer, messages: Sequence[Mapping],
                         is_end_of_turn: _EndOfTurnCheck | None = None) -> _RenderedConversation:
    chat = [{"role": message["role"], "content": message["content"]} for message in messages]
    text = _render(tokenizer, chat)
    is_end_of_turn = is_end_of_turn or _EndOfTurnCheck(tokenizer)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant" or message.get("train") is False:
            continue
        turn_text = text if index == len(chat) - 1 else _render(tokenizer, chat[: index + 1])
        if not text.startswith(turn_text):
            raise ChatTemplateError(
                f"chat template rewrites earlier turns: the rendering of the first {index + 1} messages is not a "
                f"prefix of the full conversation ({len(chat)} messages)", "rewrites_earlier_turns")
        search_start = _prompt_end(tokenizer, chat, index, turn_text)
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

    def __init__(self, tokenizer):
        try:
            template = tokenizer.get_chat_template()
        except (ValueError, TypeError):
            template = None
        self.template = template
        self.enabled = bool(template) and re.search(r"\{%-?\s*generation\s*-?%\}", template) is not None
        self.num_agreed = 0

    def _render_marked(self, tokenizer, messages: Sequence[Mapping]) -> _RenderedConversation | None:
        from transformers.utils.chat_template_utils import render_jinja_template

        chat = [{"role": message["role"], "content": message["content"]} for message in messages]
        try:
            # What apply_chat_template(tokenize=False) does for plain dict messages.
            rendered, indices = render_jinja_template(conversations=[chat], chat_template=self.template,
                                                      return_assistant_tokens_mask=True,
                                                      **tokenizer.special_tokens_map)
        except jinja2.TemplateError as error:
            raise ChatTemplateError(f"the chat template rejected the first {len(chat)} messages: {error}",
                                    "template_raised") from error
        assistant_indices = [i for i, message in enumerate(messages) if message["role"] == "assistant"]
        if len(indices[0]) != len(assistant_indices):
            return None  # blocks and assistant turns do not pair up: let the content search decide
        spans = [_TrainedSpan(index, start, end, end) for index, (start, end) in zip(assistant_indices, indices[0])
                 if messages[index].get("train") is not False]
        return _RenderedConversation(rendered[0], spans)

    def render(self, tokenizer, messages: Sequence[Mapping], is_end_of_turn: _EndOfTurnCheck) -> _RenderedConversation:
        if not self.enabled:
            return _render_conversation(tokenizer, messages, is_end_of_turn)
        marked = self._render_marked(tokenizer, messages)
        if marked is not None and self.num_agreed >= self.NUM_CHECKED:
            return marked
        searched = _render_conversation(tokenizer, messages, is_end_of_turn)
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


def _trained_mask(rendered: _RenderedConversation, offsets: Sequence[tuple[int, int]], input_ids: Sequence[int],
                  tokenizer) -> tuple[np.ndarray, list[int]]:
    """Which tokens are trained, and the token index just past each trained turn.

    A token is trained when its characters overlap a trained span. A token may reach
    outside the span only over whitespace (SentencePiece's "▁Hello" after "[/INST] "): the
    model does produce that token when it answers. A token that merges non-blank template
    text with the content would make the content untrainable on its own, so it is an error.
    """
    text = rendered.text
    bounds = np.asarray(offsets, dtype=np.int64).reshape(len(offsets), 2)
    starts, ends = bounds[:, 0], bounds[:, 1]
    trained = np.zeros(len(offsets), dtype=bool)
    turn_token_ends = []
    for span in rendered.spans:
        overlap = np.flatnonzero((starts < span.end) & (ends > span.content_start))
        if overlap.size == 0:
            continue
        for token_index in overlap[(starts[overlap] < span.content_start) | (ends[overlap] > span.end)]:
            start, end = int(starts[token_index]), int(ends[token_index])
            outside = text[start:span.content_start] + text[span.end:end]
            if outside.strip():
                raise ChatTemplateError(
                    f"assistant message {span.message_index}: token "
                    f"{tokenizer.convert_ids_to_tokens(int(input_ids[token_index]))!r} (characters {start}:{end}) "
                    f"joins the template's text {outside!r} to the trained turn, so the turn cannot be trained "
                    f"on its own tokens", "token_joins_template_text")
        trained[overlap] = True
        turn_token_ends.append(int(overlap[-1]) + 1)
    return trained, turn_token_ends


def _limit_length(num_tokens: int, trained: np.ndarray, turn_token_ends: list[int], max_tokens: int | None,
                  truncation: str) -> int:
    """The number of tokens to keep, or raise ``NoTrainedTokens`` / ``ConversationTooLong``."""
    if not trained.any():
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


def _encode(tokenizer, texts: list[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
    """``(input_ids, character offsets)`` of each text, no special tokens added: BOS comes from the template.

    The same as ``tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)``
    (a test compares with ``apply_chat_template(tokenize=True)``), straight from the Rust
    tokenizer: converting its encodings to a ``BatchEncoding`` costs as much as encoding.
    """
    encodings = tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    return [(encoding.ids, encoding.offsets) for encoding in encodings]


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
    ((input_ids, offsets),) = _encode(tokenizer, [rendered.text])
    trained, turn_token_ends = _trained_mask(rendered, offsets, input_ids, tokenizer)
    num_kept = _limit_length(len(input_ids), trained, turn_token_ends, max_tokens, truncation)
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


def _write_token_shard(path: Path, rows: list[dict[str, np.ndarray]]) -> None:
    lengths = np.array([len(row["input_ids"]) for row in rows], dtype=np.int32)
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))

    def column(name: str) -> pa.Array:
        values = np.concatenate([row[name] for row in rows]) if rows else np.zeros(0, dtype=np.int32)
        return pa.ListArray.from_arrays(offsets, pa.array(values, type=pa.int32()))

    table = pa.Table.from_arrays([column(name) for name in TOKEN_SHARD_SCHEMA.names], schema=TOKEN_SHARD_SCHEMA)
    staging = path.with_name(f".{path.name}.writing-{os.getpid()}")
    pq.write_table(table, staging)
    os.replace(staging, path)  # a reader never sees half a shard


def _label_batch(settings: tuple, conversations: list) -> list:
    """Render, tokenize (one call) and label a batch; one outcome per conversation, in order.

    An outcome is ``(input_ids int32 array, trained bool array, truncated)``, ``"no_trained_tokens"``,
    ``"too_long"``, or the ``ChatTemplateError`` (the caller decides whose fault it is).
    """
    tokenizer, is_end_of_turn, shortcut, max_seq_tokens, truncation = settings
    outcomes: list = [None] * len(conversations)
    rendered, positions = [], []
    for position, messages in enumerate(conversations):
        try:
            rendered.append(shortcut.render(tokenizer, messages, is_end_of_turn))
            positions.append(position)
        except ChatTemplateError as error:
            outcomes[position] = error
    if not rendered:
        return outcomes
    encodings = _encode(tokenizer, [item.text for item in rendered])
    for position, item, (input_ids, offsets) in zip(positions, rendered, encodings):
        try:
            trained, turn_token_ends = _trained_mask(item, offsets, input_ids, tokenizer)
            num_kept = _limit_length(len(input_ids), trained, turn_token_ends, max_seq_tokens, truncation)
        except ChatTemplateError as error:
            outcomes[position] = error
        except NoTrainedTokens:
            outcomes[position] = "no_trained_tokens"
        except ConversationTooLong:
            outcomes[position] = "too_long"
        else:
            outcomes[position] = (np.asarray(input_ids[:num_kept], dtype=np.int32), trained[:num_kept],
                                  num_kept < len(input_ids))
    return outcomes


_WORKER_SETTINGS: tuple | None = None


def _init_worker(settings: tuple) -> None:
    global _WORKER_SETTINGS
    _WORKER_SETTINGS = settings


def _label_batch_in_worker(job: tuple) -> tuple:
    uri, record_ids, conversations = job
    return uri, record_ids, _label_batch(_WORKER_SETTINGS, conversations)


class _BatchLabeller:
    """Runs :func:`_label_batch` over batches, in this process or in a pool, results in input order.

    With workers, at most ``4 * num_workers`` batches are in flight, so memory does not grow
    with the dataset; the results (and so the rows) are the same for any number of workers.
    """

    def __init__(self, settings: tuple, num_workers: int):
        self.settings, self.num_workers = settings, num_workers
        self.pool = None

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
            for uri, record_ids, conversations in jobs:
                yield uri, record_ids, _label_batch(self.settings, conversations)
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

    settings = (tokenizer, _EndOfTurnCheck(tokenizer), _MarkerShortcut(tokenizer), max_seq_tokens, truncation)
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
        rows = []
        for indices in bins[shard_start: shard_start + rows_per_shard]:
            docs = [(doc_input_ids[i], np.where(doc_trained[i], doc_input_ids[i], IGNORE_INDEX)) for i in indices]
            rows.append(pack_row(docs))
            num_tokens += len(rows[-1]["input_ids"])
            num_trained_tokens += int(sum(doc_trained[i].sum() for i in indices))
        path = out_dir / f"part-{shard_index:05d}.parquet"
        _write_token_shard(path, rows)
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
