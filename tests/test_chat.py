"""Rendering with the model's chat template, assistant-only labels, truncation, token shards.

Two kinds of tiny tokenizers are built here, so the tests do not depend on any download:
a word-level one (one token per word: exact label lists stay readable) and a byte-level BPE
(lossless: decoded trained tokens can be compared with the message text).
"""

from __future__ import annotations

import functools

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from steps.chat import (
    ChatTemplateError,
    ConversationTooLong,
    NoTrainedTokens,
    example_masked_text,
    tokenize_conversation,
    tokenize_dataset,
)

# ---------------------------------------------------------------------------------------------
# Templates

_CHATML_GENERATION_PROMPT = "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
CHATML = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}" + _CHATML_GENERATION_PROMPT
)
CHATML_WITH_MARKERS = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- generation -%}{{- message['content'] + '<|im_end|>' -}}{%- endgeneration -%}"
    "{{- '\\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}" + _CHATML_GENERATION_PROMPT
)
# Like Qwen 2.5: a system prompt appears when the conversation has none.
CHATML_DEFAULT_SYSTEM = (
    "{%- if messages[0]['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\nYou are helpful.<|im_end|>\\n' -}}"
    "{%- endif -%}" + CHATML
)
# The generation prompt has one more newline than a finished assistant turn.
CHATML_WIDER_GENERATION_PROMPT = CHATML.replace(
    "'<|im_start|>assistant\\n' -}}{%- endif", "'<|im_start|>assistant\\n\\n' -}}{%- endif")
# No generation prompt at all: the assistant header has to be skipped by searching the content.
CHATML_NO_GENERATION_PROMPT = CHATML.replace(_CHATML_GENERATION_PROMPT, "")
LLAMA3 = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}"
)
# Rewrites earlier turns: only the last system message is kept, and it goes first.
CHATML_LAST_SYSTEM_ONLY = (
    "{%- set systems = messages | selectattr('role', 'equalto', 'system') | list -%}"
    "{%- if systems -%}{{- '<|im_start|>system\\n' + systems[-1]['content'] + '<|im_end|>\\n' -}}{%- endif -%}"
    "{%- for message in messages if message['role'] != 'system' -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}" + _CHATML_GENERATION_PROMPT
)
# Rewrites earlier turns: the last assistant message gets an empty think block, the others not.
CHATML_THINK_ON_LAST = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' and loop.last -%}"
    "{{- '<|im_start|>assistant\\n<think></think>' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}" + _CHATML_GENERATION_PROMPT
)
CHATML_ALTERNATING = (
    "{%- for message in messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') -}}"
    "{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}" + _CHATML_GENERATION_PROMPT
)

# Like Mistral / Llama 2: no generation prompt at all, the system prompt folded into the first
# user turn, an exception unless roles alternate, the answer right after "[/INST]", then EOS.
_SYSTEM_INTO_FIRST_USER = (
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
)
_RAISE_UNLESS_ALTERNATING = (
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') -}}{%- endif -%}"
)
MISTRAL = (
    "{{- bos_token -}}" + _SYSTEM_INTO_FIRST_USER +
    "{%- for message in loop_messages -%}" + _RAISE_UNLESS_ALTERNATING +
    "{%- if message['role'] == 'user' -%}"
    "{{- '[INST] ' + (first_user_prefix if loop.first else '') + message['content'] + ' [/INST]' -}}"
    "{%- else -%}{{- message['content'] + eos_token -}}{%- endif -%}"
    "{%- endfor -%}"
)
# Like Gemma: no system role (folded into the first user turn), "model" for the assistant,
# content through `| trim`, <end_of_turn> (not the EOS) ends a turn.
GEMMA = (
    "{{- bos_token -}}" + _SYSTEM_INTO_FIRST_USER +
    "{%- for message in loop_messages -%}" + _RAISE_UNLESS_ALTERNATING +
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{- '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') + message['content'] | trim"
    " + '<end_of_turn>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<start_of_turn>model\\n' -}}{%- endif -%}"
)
# No end-of-turn token at all: turns are separated by blank lines only.
PLAIN_NO_END_OF_TURN = (
    "{%- for message in messages -%}{{- message['role'] + '\\n' + message['content'] + '\\n\\n' -}}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'assistant\\n' -}}{%- endif -%}"
)

SPECIAL_TOKENS = ["<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                  "<|eot_id|>", "<think>", "</think>", "<s>", "</s>", "[INST]", "[/INST]", "<bos>", "<eos>",
                  "<start_of_turn>", "<end_of_turn>"]
END_OF_TURN = {CHATML: "<|im_end|>", CHATML_WITH_MARKERS: "<|im_end|>", CHATML_DEFAULT_SYSTEM: "<|im_end|>",
               LLAMA3: "<|eot_id|>", MISTRAL: "</s>", GEMMA: "<end_of_turn>", PLAIN_NO_END_OF_TURN: ""}
# bos_token, eos_token of each family's tokenizer.
SPECIAL = {CHATML: (None, "<|im_end|>"), LLAMA3: ("<|begin_of_text|>", "<|eot_id|>"), MISTRAL: ("<s>", "</s>"),
           GEMMA: ("<bos>", "<eos>"), PLAIN_NO_END_OF_TURN: (None, "<|im_end|>")}

# ---------------------------------------------------------------------------------------------
# Tokenizers

WORDS = ["<unk>", *SPECIAL_TOKENS, "system", "user", "assistant", "tool", "model", "Be", "brief.", "Hi", "Hello!",
         "How",
         "are", "you?", "Fine.", "Bye", "Bye!", "You", "helpful."]


def ids(words: str) -> list[int]:
    """Word-level ids of space-separated words; ``-`` is label -100."""
    return [-100 if word == "-" else WORDS.index(word) for word in words.split()]


def word_tokenizer(template: str, *, bos_token: str | None = None, eos_token: str = "<|im_end|>",
                   post_processor_adds_bos: bool = False) -> PreTrainedTokenizerFast:
    """One token per whitespace-separated word (newlines vanish), control tokens split out."""
    backend = Tokenizer(models.WordLevel({word: index for index, word in enumerate(WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in SPECIAL_TOKENS])
    if post_processor_adds_bos:
        # As in Llama 3's tokenizer.json: a plain tokenizer call would add a BOS of its own.
        backend.post_processor = processors.TemplateProcessing(
            single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", WORDS.index("<|begin_of_text|>"))])
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token=bos_token,
                                   eos_token=eos_token, chat_template=template)


_BYTE_CORPUS = [
    "system\nuser\nassistant\ntool\nBe brief. Hi Hello! How can I help? Tell me a joke.",
    "Why did the chicken cross the road? To get to the other side. The weather is 21 degrees.",
    "Summarise: the cat sat on the mat. A cat sat. What is the weather? Let me check.",
] * 3
_byte_backend_cache: list[Tokenizer] = []


def byte_tokenizer(template: str, *, bos_token: str | None = None,
                   eos_token: str = "<|im_end|>") -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on a few sentences: every string round-trips through decode."""
    if not _byte_backend_cache:
        backend = Tokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        backend.train_from_iterator(_BYTE_CORPUS, trainer)
        _byte_backend_cache.append(backend)
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_byte_backend_cache[0].to_str()),
                                   bos_token=bos_token, eos_token=eos_token, chat_template=template,
                                   clean_up_tokenization_spaces=False)


@pytest.fixture(scope="module")
def builtin_tokenizer(tmp_path_factory):
    """The embedded tiny-llama tokenizer (ChatML with generation markers), when steps.builtin is there."""
    try:
        from steps.builtin import ensure_builtin_model
    except ImportError:
        pytest.skip("steps.builtin is not available")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ensure_builtin_model("tiny-llama", tmp_path_factory.mktemp("models")))


def user(content):
    return {"role": "user", "content": content}


def assistant(content, train=True):
    return {"role": "assistant", "content": content, "train": train}


TWO_TURNS = [
    {"role": "system", "content": "Be brief."},
    user("Hi"),
    assistant("Hello!", train=False),
    user("How are you?"),
    assistant("Fine."),
]
CONVERSATIONS = [
    TWO_TURNS,
    [user("Hi"), assistant("Hello! How can I help?"), user("Tell me a joke."),
     assistant("Why did the chicken cross the road? To get to the other side.")],
    [{"role": "system", "content": "Be brief."}, user("What is the weather?"), assistant("Let me check."),
     {"role": "tool", "content": "{\"celsius\": 21}"}, assistant("It is 21 degrees. Ünïcödé ✓")],
]


def trained_runs(tokenizer, result) -> list[str]:
    """Decoded text of each maximal run of trained tokens."""
    runs, current = [], []
    for token, label in zip(result.input_ids, result.labels):
        if label != -100:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(run, skip_special_tokens=False) for run in runs]


# ---------------------------------------------------------------------------------------------
# Exact labels


def test_chatml_labels_exact():
    tokenizer = word_tokenizer(CHATML)
    result = tokenize_conversation(tokenizer, TWO_TURNS)
    assert result.input_ids == ids(
        "<|im_start|> system Be brief. <|im_end|> "
        "<|im_start|> user Hi <|im_end|> "
        "<|im_start|> assistant Hello! <|im_end|> "
        "<|im_start|> user How are you? <|im_end|> "
        "<|im_start|> assistant Fine. <|im_end|>")
    assert result.labels == ids(
        "- - - - - "
        "- - - - "
        "- - - - "
        "- - - - - - "
        "- - Fine. <|im_end|>")
    assert result.num_trained_tokens == 2 and not result.truncated

    everything = tokenize_conversation(tokenizer, [dict(m, train=True) for m in TWO_TURNS])
    assert everything.labels == ids("- - - - - - - - - - - Hello! <|im_end|> - - - - - - - - Fine. <|im_end|>")


def test_llama3_labels_exact_with_one_bos():
    tokenizer = word_tokenizer(LLAMA3, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                               post_processor_adds_bos=True)
    bos = WORDS.index("<|begin_of_text|>")
    assert tokenizer("Hi")["input_ids"] == [bos, WORDS.index("Hi")]  # the trap: a second BOS
    result = tokenize_conversation(tokenizer, TWO_TURNS)
    assert result.input_ids == ids(
        "<|begin_of_text|> "
        "<|start_header_id|> system <|end_header_id|> Be brief. <|eot_id|> "
        "<|start_header_id|> user <|end_header_id|> Hi <|eot_id|> "
        "<|start_header_id|> assistant <|end_header_id|> Hello! <|eot_id|> "
        "<|start_header_id|> user <|end_header_id|> How are you? <|eot_id|> "
        "<|start_header_id|> assistant <|end_header_id|> Fine. <|eot_id|>")
    assert result.input_ids.count(bos) == 1
    assert result.labels == ids("- " * 27 + "Fine. <|eot_id|>")


def test_mistral_like_labels_exact_without_generation_prompt():
    tokenizer = word_tokenizer(MISTRAL, bos_token="<s>", eos_token="</s>")
    result = tokenize_conversation(tokenizer, TWO_TURNS)
    # The system prompt is folded into the first [INST]; the answer follows "[/INST]" directly.
    assert result.input_ids == ids("<s> [INST] Be brief. Hi [/INST] Hello! </s> [INST] How are you? [/INST] Fine. </s>")
    assert result.labels == ids("- " * 13 + "Fine. </s>")
    everything = tokenize_conversation(tokenizer, [dict(m, train=True) for m in TWO_TURNS])
    assert everything.labels == ids("- - - - - - Hello! </s> - - - - - Fine. </s>")


def test_gemma_like_labels_exact_with_model_role_and_end_of_turn():
    tokenizer = word_tokenizer(GEMMA, bos_token="<bos>", eos_token="<eos>")
    result = tokenize_conversation(tokenizer, [dict(m, train=True) for m in TWO_TURNS])
    assert result.input_ids == ids(
        "<bos> <start_of_turn> user Be brief. Hi <end_of_turn> "
        "<start_of_turn> model Hello! <end_of_turn> "
        "<start_of_turn> user How are you? <end_of_turn> "
        "<start_of_turn> model Fine. <end_of_turn>")
    assert result.labels == ids("- - - - - - - - - Hello! <end_of_turn> - - - - - - - - Fine. <end_of_turn>")
    assert tokenize_conversation(tokenizer, TWO_TURNS).labels == ids("- " * 19 + "Fine. <end_of_turn>")


def test_template_without_end_of_turn_token_trains_the_content_only():
    tokenizer = word_tokenizer(PLAIN_NO_END_OF_TURN)
    result = tokenize_conversation(tokenizer, [dict(m, train=True) for m in TWO_TURNS])
    assert result.input_ids == ids("system Be brief. user Hi assistant Hello! user How are you? assistant Fine.")
    assert result.labels == ids("- - - - - - Hello! - - - - - Fine.")


FAMILIES = [CHATML, LLAMA3, MISTRAL, GEMMA, PLAIN_NO_END_OF_TURN]
ALTERNATING_CONVERSATIONS = CONVERSATIONS[:2]  # system + train:false turn; multi-turn without system


@pytest.mark.parametrize("template", FAMILIES, ids=["chatml", "llama3", "mistral", "gemma", "plain"])
def test_every_family_trains_exactly_content_and_end_of_turn(template):
    bos_token, eos_token = SPECIAL[template]
    tokenizer = byte_tokenizer(template, bos_token=bos_token, eos_token=eos_token)
    for messages in ALTERNATING_CONVERSATIONS:
        for variant in (messages, [dict(m, train=True) for m in messages]):
            result = tokenize_conversation(tokenizer, variant)
            expected = [m["content"] + END_OF_TURN[template] for m in variant
                        if m["role"] == "assistant" and m.get("train", True)]
            assert trained_runs(tokenizer, result) == expected
            text = tokenizer.apply_chat_template([{"role": m["role"], "content": m["content"]} for m in variant],
                                                 tokenize=False)
            assert tokenizer.decode(result.input_ids) == text
            if bos_token:
                assert result.input_ids.count(tokenizer.convert_tokens_to_ids(bos_token)) == 1


@pytest.mark.parametrize("template", [MISTRAL, GEMMA], ids=["mistral", "gemma"])
def test_roles_that_do_not_alternate_are_the_records_fault(template):
    tokenizer = byte_tokenizer(template, bos_token=SPECIAL[template][0], eos_token=SPECIAL[template][1])
    with pytest.raises(ChatTemplateError, match="roles must alternate") as error:
        tokenize_conversation(tokenizer, CONVERSATIONS[2])  # has a tool turn
    assert error.value.reason == "template_raised" and error.value.reason in ChatTemplateError.RECORD_REASONS


def test_default_system_prompt_is_not_trained():
    result = tokenize_conversation(word_tokenizer(CHATML_DEFAULT_SYSTEM), [user("Hi"), assistant("Hello!")])
    assert result.input_ids == ids("<|im_start|> system You are helpful. <|im_end|> <|im_start|> user Hi <|im_end|> "
                                   "<|im_start|> assistant Hello! <|im_end|>")
    assert result.labels == ids("- " * 12 + "Hello! <|im_end|>")


def test_generation_prompt_that_differs_by_whitespace():
    result = tokenize_conversation(word_tokenizer(CHATML_WIDER_GENERATION_PROMPT), TWO_TURNS)
    assert result.labels == tokenize_conversation(word_tokenizer(CHATML), TWO_TURNS).labels


def test_content_found_after_the_header_without_generation_prompt():
    # The content "assistant" also occurs in the header; only the real one is followed by <|im_end|>.
    result = tokenize_conversation(word_tokenizer(CHATML_NO_GENERATION_PROMPT), [user("Hi"), assistant("assistant")])
    assert result.labels == ids("- - - - - - assistant <|im_end|>")


# ---------------------------------------------------------------------------------------------
# Byte-level: decoded trained tokens, markers parity


@pytest.mark.parametrize("template", [CHATML, CHATML_WITH_MARKERS, CHATML_DEFAULT_SYSTEM, LLAMA3])
def test_trained_tokens_decode_to_content_and_end_of_turn(template):
    tokenizer = byte_tokenizer(template, bos_token="<|begin_of_text|>")
    for messages in CONVERSATIONS:
        result = tokenize_conversation(tokenizer, messages)
        expected = [m["content"] + END_OF_TURN[template] for m in messages
                    if m["role"] == "assistant" and m.get("train", True)]
        assert trained_runs(tokenizer, result) == expected
        assert tokenizer.decode(result.input_ids) == tokenizer.apply_chat_template(
            [{"role": m["role"], "content": m["content"]} for m in messages], tokenize=False)


def test_trimmed_and_verbatim_blanks():
    messages = [user("Summarise: the cat sat on the mat."), assistant("  A cat sat.  \n")]
    # `| trim`: the template renders (and the model learns) the content without its blanks.
    llama3 = byte_tokenizer(LLAMA3, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    assert trained_runs(llama3, tokenize_conversation(llama3, messages)) == ["A cat sat.<|eot_id|>"]
    # Verbatim: the blanks are part of the content, so they are trained too.
    chatml = byte_tokenizer(CHATML)
    assert trained_runs(chatml, tokenize_conversation(chatml, messages)) == ["  A cat sat.  \n<|im_end|>"]


def _assert_labels_equal_assistant_mask(tokenizer, messages):
    result = tokenize_conversation(tokenizer, messages)
    reference = tokenizer.apply_chat_template([{"role": m["role"], "content": m["content"]} for m in messages],
                                              return_assistant_tokens_mask=True, return_dict=True)
    assert result.input_ids == reference["input_ids"]
    assert [int(label != -100) for label in result.labels] == reference["assistant_masks"]
    assert sum(reference["assistant_masks"]) > 0


def test_labels_equal_generation_markers_mask():
    tokenizer = byte_tokenizer(CHATML_WITH_MARKERS)
    all_trained = [[dict(m, train=True) for m in messages] for messages in CONVERSATIONS]
    for messages in [*all_trained, [user("Summarise: the cat sat on the mat."), assistant("  A cat sat.  \n")]]:
        _assert_labels_equal_assistant_mask(tokenizer, messages)


def test_labels_equal_generation_markers_mask_builtin(builtin_tokenizer):
    assert "generation" in builtin_tokenizer.chat_template
    for messages in CONVERSATIONS:
        _assert_labels_equal_assistant_mask(builtin_tokenizer, [dict(m, train=True) for m in messages])
    result = tokenize_conversation(builtin_tokenizer, TWO_TURNS)
    assert trained_runs(builtin_tokenizer, result) == ["Fine.<|im_end|>"]
    assert example_masked_text(builtin_tokenizer, result.input_ids, result.labels) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nHow are you?<|im_end|>\n"
        "<|im_start|>assistant\n[[Fine.<|im_end|>]]\n")


# ---------------------------------------------------------------------------------------------
# Templates that cannot give assistant-only labels


def test_template_that_keeps_only_the_last_system_message_raises():
    messages = [{"role": "system", "content": "Be brief."}, user("Hi"), assistant("Hello!"),
                {"role": "system", "content": "You are helpful."}, user("Bye"), assistant("Bye!")]
    with pytest.raises(ChatTemplateError, match="chat template rewrites earlier turns: the rendering of the first 3 "
                                                "messages is not a prefix of the full conversation"):
        tokenize_conversation(word_tokenizer(CHATML_LAST_SYSTEM_ONLY), messages)


def test_template_that_renders_the_last_turn_differently_raises():
    messages = [user("Hi"), assistant("Hello!"), user("Bye"), assistant("Bye!")]
    with pytest.raises(ChatTemplateError, match="chat template rewrites earlier turns: the rendering of the first 2 "
                                                "messages is not a prefix of the full conversation"):
        tokenize_conversation(word_tokenizer(CHATML_THINK_ON_LAST), messages)
    # One turn is fine: the template's "<think></think>" is scaffolding, not trained.
    result = tokenize_conversation(word_tokenizer(CHATML_THINK_ON_LAST), messages[:2])
    assert result.labels == ids("- - - - - - - - Hello! <|im_end|>")


def test_template_exception_reaches_the_caller():
    with pytest.raises(ChatTemplateError, match="Conversation roles must alternate user/assistant"):
        tokenize_conversation(word_tokenizer(CHATML_ALTERNATING), [user("Hi"), user("Bye"), assistant("Bye!")])


def test_template_that_changes_the_content_or_ends_turns_with_plain_text_raises():
    upper = CHATML.replace("message['content']", "message['content'] | upper")
    with pytest.raises(ChatTemplateError, match="assistant message 1: the chat template does not render its content"):
        tokenize_conversation(word_tokenizer(upper), [user("Hi"), assistant("Hello!")])
    # "END" is not a token of its own, so it is not an end-of-turn token the model could learn to stop at.
    plain_end = CHATML.replace("'<|im_end|>\\n'", "' END\\n'")
    with pytest.raises(ChatTemplateError, match="assistant message 1: what follows its content is not end-of-turn"):
        tokenize_conversation(word_tokenizer(plain_end), [user("Hi"), assistant("Hello!")])


def _char_tokenizer(template: str, merges: list[tuple[str, str]]) -> PreTrainedTokenizerFast:
    """Characters plus the given merges, no pre-tokenizer: merges may cross the template/content border."""
    alphabet = sorted(set("assistantuser:>Hi \n"))
    vocab = {char: index for index, char in enumerate(alphabet)}
    for left, right in merges:
        vocab[left + right] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.add_special_tokens([AddedToken("<|end|>", special=True, normalized=False)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|end|>", chat_template=template)


def test_token_that_joins_template_text_to_the_content():
    template = ("{%- for m in messages -%}{{- m['role'] + sep + m['content'] + '<|end|>' -}}{%- endfor -%}"
                "{%- if add_generation_prompt -%}{{- 'assistant' + sep -}}{%- endif -%}")
    messages = [user("Hi"), assistant("Hi")]
    # ">H" merges the template's ">" with the content's "H": the content cannot be trained alone.
    merging = _char_tokenizer(template.replace("sep", "'>'"), [(">", "H")])
    with pytest.raises(ChatTemplateError, match="token '>H' .* joins the template's text '>' to the trained turn"):
        tokenize_conversation(merging, messages)
    # " H" joins only a blank of the template's ": " to the content: trained, as the model says it.
    blank = _char_tokenizer(template.replace("sep", "': '"), [(" ", "H")])
    result = tokenize_conversation(blank, messages)
    assert blank.convert_ids_to_tokens([t for t in result.labels if t != -100]) == [" H", "i", "<|end|>"]


# ---------------------------------------------------------------------------------------------
# Length limits and conversations without trained tokens


def test_truncation_drop_and_turn():
    tokenizer = word_tokenizer(CHATML)
    messages = [dict(m, train=True) for m in TWO_TURNS]  # 23 tokens; the first answer ends at token 13
    assert len(tokenize_conversation(tokenizer, messages, max_tokens=23).input_ids) == 23
    with pytest.raises(ConversationTooLong, match="23 tokens, more than max_tokens=22"):
        tokenize_conversation(tokenizer, messages, max_tokens=22, truncation="drop")
    cut = tokenize_conversation(tokenizer, messages, max_tokens=22, truncation="turn")
    assert cut.truncated
    assert cut.input_ids == ids("<|im_start|> system Be brief. <|im_end|> <|im_start|> user Hi <|im_end|> "
                                "<|im_start|> assistant Hello! <|im_end|>")
    assert cut.labels == ids("- - - - - - - - - - - Hello! <|im_end|>")
    assert len(tokenize_conversation(tokenizer, messages, max_tokens=13, truncation="turn").input_ids) == 13
    with pytest.raises(ConversationTooLong):
        tokenize_conversation(tokenizer, messages, max_tokens=12, truncation="turn")
    # The only turn that fits is not trained: nothing would be left to learn.
    with pytest.raises(ConversationTooLong):
        tokenize_conversation(tokenizer, TWO_TURNS, max_tokens=22, truncation="turn")
    with pytest.raises(ValueError, match="truncation must be one of"):
        tokenize_conversation(tokenizer, messages, truncation="left")


def test_no_trained_tokens():
    with pytest.raises(NoTrainedTokens):
        tokenize_conversation(word_tokenizer(CHATML), [user("Hi"), assistant("Hello!", train=False)])
    with pytest.raises(NoTrainedTokens):
        tokenize_conversation(word_tokenizer(CHATML), [{"role": "system", "content": "Be brief."}, user("Hi")])


def test_example_masked_text():
    tokenizer = byte_tokenizer(CHATML)
    result = tokenize_conversation(tokenizer, [user("Hi"), assistant("Hello!"), user("Bye"), assistant("Bye!")])
    assert example_masked_text(tokenizer, result.input_ids, result.labels) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n[[Hello!<|im_end|>]]\n"
        "<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n[[Bye!<|im_end|>]]\n")


# ---------------------------------------------------------------------------------------------
# Datasets

_MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string()), ("train", pa.bool_())])
_DATA_SCHEMA = pa.schema([("id", pa.string()), ("messages", pa.list_(_MESSAGE)), ("meta", pa.string()),
                          ("source", pa.string())])


def _write_data_shard(path, conversations) -> str:
    records = [{"id": f"record-{index}", "meta": "{}", "source": "test",
                "messages": [{"role": m["role"], "content": m["content"], "train": m.get("train", True)}
                             for m in messages]}
               for index, messages in enumerate(conversations)]
    pq.write_table(pa.Table.from_pylist(records, schema=_DATA_SCHEMA), path)
    return str(path)


def test_tokenize_dataset_packs_and_counts(tmp_path):
    tokenizer = word_tokenizer(CHATML)
    short = [user("Hi"), assistant("Hello!")]  # 8 tokens, 2 trained
    conversations = [
        [dict(m, train=True) for m in TWO_TURNS],  # 23 tokens: cut to 13 with "turn", dropped with "drop"
        short, short, short,
        [user("Hi"), assistant("Hello!", train=False)],  # no trained token
        [user("How are you?"), assistant("Fine.")],  # 10 tokens, 2 trained
    ]
    first = _write_data_shard(tmp_path / "a.parquet", conversations[:3])
    second = _write_data_shard(tmp_path / "b.parquet", conversations[3:])

    stats = tokenize_dataset(tokenizer, [first, second], tmp_path / "tokens", max_seq_tokens=21, truncation="turn",
                             rows_per_shard=1)
    # Lengths 13, 8, 8, 8, 10 -> best fit decreasing into 21: [13, 8], [10, 8], [8].
    assert stats == {
        "uris": [str(tmp_path / "tokens" / f"part-0000{i}.parquet") for i in range(3)],
        "num_conversations": 6, "num_packed_conversations": 5, "num_rows": 3, "num_tokens": 47,
        "num_trained_tokens": 10, "num_truncated": 1, "num_dropped_too_long": 0, "num_no_trained_tokens": 1,
        "num_template_rejects": 0, "template_reject_reasons": {}, "packing_efficiency": 47 / 63,
        "max_seq_tokens": 21,
    }
    rows = [row for uri in stats["uris"] for row in pq.read_table(uri).to_pylist()]
    assert pq.read_schema(stats["uris"][0]).field("labels").type == pa.list_(pa.int32())
    short_ids = ids("<|im_start|> user Hi <|im_end|> <|im_start|> assistant Hello! <|im_end|>")
    short_labels = ids("- - - - - - Hello! <|im_end|>")
    assert rows[0]["input_ids"] == tokenize_conversation(
        tokenizer, conversations[0], max_tokens=21, truncation="turn").input_ids + short_ids
    assert rows[0]["labels"] == ids("- " * 11 + "Hello! <|im_end|>") + short_labels
    assert rows[0]["position_ids"] == list(range(13)) + list(range(8))
    assert rows[1]["labels"] == ids("- - - - - - - - Fine. <|im_end|>") + short_labels
    assert rows[2] == {"input_ids": short_ids, "labels": short_labels, "position_ids": list(range(8))}

    # Same inputs, same rows (with 2 worker processes too); "drop" drops the long one; a rerun
    # replaces the earlier shards.
    again = tokenize_dataset(tokenizer, [first, second], tmp_path / "tokens", max_seq_tokens=21, truncation="turn",
                             rows_per_shard=1, num_workers=2)
    assert again == stats and [row for uri in again["uris"] for row in pq.read_table(uri).to_pylist()] == rows
    dropped = tokenize_dataset(tokenizer, [first, second], tmp_path / "tokens", max_seq_tokens=21,
                               truncation="drop")
    assert (dropped["num_dropped_too_long"], dropped["num_truncated"], dropped["num_rows"]) == (1, 0, 2)
    assert sorted(p.name for p in (tmp_path / "tokens").iterdir()) == ["part-00000.parquet"]


def test_tokenize_dataset_counts_conversations_the_template_rejects(tmp_path):
    shard = _write_data_shard(tmp_path / "a.parquet", [[user("Hi"), assistant("Hello!")],
                                                      [user("Hi"), user("Bye"), assistant("Bye!")]])
    tokenizer = word_tokenizer(CHATML_ALTERNATING)
    stats = tokenize_dataset(tokenizer, [shard], tmp_path / "tokens", max_seq_tokens=64, truncation="drop",
                             max_reject_fraction=0.5, num_workers=2)
    assert (stats["num_conversations"], stats["num_packed_conversations"], stats["num_rows"]) == (2, 1, 1)
    assert (stats["num_template_rejects"], stats["template_reject_reasons"]) == (1, {"template_raised": 1})
    # Above the allowed share the step fails, naming the reasons and the first rejected record.
    with pytest.raises(ChatTemplateError, match=r"rejected 1 of 2 conversations \(template_raised: 1\), more than "
                                                r"max_reject_fraction=0.0; the first: .*a\.parquet, record record-1: "
                                                r".*roles must alternate"):
        tokenize_dataset(tokenizer, [shard], tmp_path / "tokens", max_seq_tokens=64, truncation="drop")


def test_tokenize_dataset_fails_on_a_template_that_rewrites_earlier_turns(tmp_path):
    two_systems = [{"role": "system", "content": "Be brief."}, user("Hi"), assistant("Hello!"),
                   {"role": "system", "content": "You are helpful."}, user("Bye"), assistant("Bye!")]
    shard = _write_data_shard(tmp_path / "a.parquet", [[user("Hi"), assistant("Hello!")], two_systems])
    # The template is at fault, not the data: no share of rejects makes that acceptable.
    with pytest.raises(ChatTemplateError, match=r"a\.parquet, record record-1: chat template rewrites earlier turns"
                       ) as error:
        tokenize_dataset(word_tokenizer(CHATML_LAST_SYSTEM_ONLY), [shard], tmp_path / "tokens", max_seq_tokens=64,
                         truncation="drop", max_reject_fraction=1.0, num_workers=2)
    assert error.value.reason == "rewrites_earlier_turns"


# ---------------------------------------------------------------------------------------------
# One render per conversation for templates with generation markers

def test_marker_shortcut_gives_the_rows_of_the_content_search(builtin_tokenizer, tmp_path, monkeypatch):
    from steps.chat import renderer

    shard = _write_data_shard(tmp_path / "a.parquet", CONVERSATIONS * 4)
    searched = []
    original = renderer._render_conversation
    monkeypatch.setattr(renderer, "_render_conversation",
                        lambda *args, **kwargs: searched.append(1) or original(*args, **kwargs))
    monkeypatch.setattr(renderer._MarkerShortcut, "NUM_CHECKED", 5)
    fast = tokenize_dataset(builtin_tokenizer, [shard], tmp_path / "fast", max_seq_tokens=256, truncation="drop")
    assert len(searched) == 5  # the first 5 conversations are checked, the other 7 rendered once
    monkeypatch.setattr(renderer._MarkerShortcut, "NUM_CHECKED", 10**9)
    slow = tokenize_dataset(builtin_tokenizer, [shard], tmp_path / "slow", max_seq_tokens=256, truncation="drop")
    assert len(searched) == 5 + 12
    assert {k: v for k, v in fast.items() if k != "uris"} == {k: v for k, v in slow.items() if k != "uris"}
    assert pq.read_table(fast["uris"][0]).to_pylist() == pq.read_table(slow["uris"][0]).to_pylist()


def test_marker_shortcut_turns_itself_off_when_markers_leave_out_the_end_of_turn():
    from steps.chat.renderer import _MarkerShortcut
    from steps.chat.template import _EndOfTurnCheck

    # The model would never learn to stop: the content search trains <|im_end|> anyway.
    content_only = CHATML_WITH_MARKERS.replace("message['content'] + '<|im_end|>' -}}{%- endgeneration -%}",
                                               "message['content'] -}}{%- endgeneration -%}{{- '<|im_end|>' -}}")
    assert content_only != CHATML_WITH_MARKERS
    for template, enabled in ((CHATML_WITH_MARKERS, True), (content_only, False), (CHATML, False)):
        tokenizer = byte_tokenizer(template)
        shortcut = _MarkerShortcut(tokenizer)
        rendered = shortcut.render(tokenizer, TWO_TURNS, _EndOfTurnCheck(tokenizer))
        assert shortcut.enabled is enabled
        assert trained_runs(tokenizer, tokenize_conversation(tokenizer, TWO_TURNS)) == ["Fine.<|im_end|>"]
        assert rendered.text.endswith("Fine.<|im_end|>\n")


# ---------------------------------------------------------------------------------------------
# Template skeletons: Jinja runs once per conversation shape, not once per render

# Templates that only print each content (the skeletons apply to them); the others read it.
PRINT_ONLY = [CHATML, CHATML_WITH_MARKERS, CHATML_DEFAULT_SYSTEM, CHATML_WIDER_GENERATION_PROMPT,
              CHATML_NO_GENERATION_PROMPT, CHATML_THINK_ON_LAST, CHATML_ALTERNATING, CHATML_LAST_SYSTEM_ONLY,
              PLAIN_NO_END_OF_TURN]
# Contents that a substitution could get wrong: template syntax, placeholder characters, blanks.
ODD_CONTENTS = [
    [{"role": "system", "content": " {{ messages }} {% if x %}"}, user("\ue0000\ue001 \\n"), assistant("  Hi  "),
     user(""), assistant("\n<|im_end|>\n")],
    [user("assistant"), assistant("assistant"), user("Hi"), assistant("Hello!", train=False)],
]


def test_templates_that_read_the_content_are_told_apart():
    from steps.chat import content_opaque_violation

    assert [content_opaque_violation(template) for template in PRINT_ONLY] == [None] * len(PRINT_ONLY)
    assert content_opaque_violation(LLAMA3) == "'content' is used by Filter, not only printed"
    assert content_opaque_violation(GEMMA) == "'content' is used by Assign, not only printed"
    assert content_opaque_violation(MISTRAL) == "'content' is used by Assign, not only printed"
    assert {template: content_opaque_violation(template) for template in [
        "{{ messages | tojson }}",
        "{% for m in messages %}{{ m }}{% endfor %}",
        "{% for m in messages %}{% if m == messages[0] %}same{% endif %}{% endfor %}",
        "{% for m in messages %}{{ m.items() }}{% endfor %}",
        "{% for m in messages %}{{ m.get('content') }}{% endfor %}",
        "{% if '<think>' in messages[-1]['content'] %}think{% endif %}",
        "{% for m in messages %}{{ loop.nextitem }}{% endfor %}",
        "{% macro show(x) %}{{ x }}{% endmacro %}{{ show(messages[0]['content']) }}",
        "{% for m in messages %}{% for key in m %}{{ m[key] | trim }}{% endfor %}{% endfor %}",
        "{{ messages[0]['content'] if messages else '' }}",
        "{{ strftime_now('%d %b %Y') }}",
    ]} == {
        "{{ messages | tojson }}": "filter 'tojson' is not analysed",
        "{% for m in messages %}{{ m }}{% endfor %}": "a message (or list of them) may reach Output",
        "{% for m in messages %}{% if m == messages[0] %}same{% endif %}{% endfor %}":
            "a message (or list of them) may reach Compare",
        "{% for m in messages %}{{ m.items() }}{% endfor %}": "method 'items' is not analysed",
        "{% for m in messages %}{{ m.get('content') }}{% endfor %}": "'content' is named by Call",
        "{% if '<think>' in messages[-1]['content'] %}think{% endif %}":
            "'content' is used by Operand, not only printed",
        "{% for m in messages %}{{ loop.nextitem }}{% endfor %}": "a message (or list of them) may reach Output",
        "{% macro show(x) %}{{ x }}{% endmacro %}{{ show(messages[0]['content']) }}": "Macro is not analysed",
        "{% for m in messages %}{% for key in m %}{{ m[key] | trim }}{% endfor %}{% endfor %}":
            "a message (or list of them) may reach Filter",
        "{{ messages[0]['content'] if messages else '' }}": "'content' is used by CondExpr, not only printed",
        "{{ strftime_now('%d %b %Y') }}": "function 'strftime_now' is not analysed",
    }


@pytest.mark.parametrize("template", PRINT_ONLY)
def test_skeleton_renders_equal_the_templates_own(template, monkeypatch):
    from steps.chat.renderer import _TemplateSkeletons
    from steps.chat.template import _render, _render_with_markers

    monkeypatch.setattr(_TemplateSkeletons, "NUM_VERIFIED", 0)  # only a shape's first render is checked
    tokenizer = byte_tokenizer(template)
    skeletons = _TemplateSkeletons(tokenizer)
    assert skeletons.enabled
    for _ in range(2):  # the second time every shape is known
        for messages in CONVERSATIONS + ODD_CONTENTS:
            chat = [{"role": m["role"], "content": m["content"]} for m in messages]
            for num_messages in range(1, len(chat) + 1):
                for add_generation_prompt in (False, True):
                    outcomes = []
                    for render in (skeletons.render, functools.partial(_render, tokenizer)):
                        try:
                            outcomes.append(render(chat[:num_messages], add_generation_prompt))
                        except ChatTemplateError as error:
                            outcomes.append((str(error), error.reason))
                    assert outcomes[0] == outcomes[1]
            if template == CHATML_WITH_MARKERS:
                assert skeletons.render_marked(messages) == _render_with_markers(tokenizer, template, chat)
    assert skeletons.enabled


def test_tokenize_dataset_renders_each_shape_once_and_gives_the_same_rows(tmp_path, monkeypatch):
    from steps.chat import renderer

    renders = []
    original = renderer._render
    monkeypatch.setattr(renderer, "_render", lambda *args, **kwargs: renders.append(1) or original(*args, **kwargs))
    monkeypatch.setattr(renderer._TemplateSkeletons, "NUM_VERIFIED", 0)
    tokenizer = byte_tokenizer(CHATML)
    once = _write_data_shard(tmp_path / "once.parquet", CONVERSATIONS)
    four_times = _write_data_shard(tmp_path / "four.parquet", CONVERSATIONS * 4)
    tokenize_dataset(tokenizer, [once], tmp_path / "once", max_seq_tokens=256, truncation="drop")
    num_renders_once = len(renders)
    fast = tokenize_dataset(tokenizer, [four_times], tmp_path / "fast", max_seq_tokens=256, truncation="drop")
    # The content search needs 10 different renders (conversation A: the whole and one generation prompt; B, C:
    # the whole, one earlier turn and two generation prompts); each shape is rendered with placeholders, then
    # checked against Jinja once: the same 20 renders for 12 conversations as for 3.
    assert (num_renders_once, len(renders) - num_renders_once) == (2 * 10, 2 * 10)
    monkeypatch.setattr(renderer, "content_opaque_violation", lambda template: "turned off by the test")
    slow = tokenize_dataset(tokenizer, [four_times], tmp_path / "slow", max_seq_tokens=256, truncation="drop")
    assert len(renders) - 2 * num_renders_once == 4 * 10  # without skeletons, every render of every conversation
    assert {k: v for k, v in fast.items() if k != "uris"} == {k: v for k, v in slow.items() if k != "uris"}
    assert pq.read_table(fast["uris"][0]).to_pylist() == pq.read_table(slow["uris"][0]).to_pylist()


def test_skeletons_turn_themselves_off_when_the_template_reads_the_content(monkeypatch):
    from steps.chat import renderer
    from steps.chat.renderer import _TemplateSkeletons
    from steps.chat.template import _render

    # As if the analysis had missed LLAMA3's `| trim`: the check against Jinja's own rendering catches it.
    monkeypatch.setattr(renderer, "content_opaque_violation", lambda template: None)
    tokenizer = byte_tokenizer(LLAMA3, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    skeletons = _TemplateSkeletons(tokenizer)
    assert skeletons.enabled
    chat = [{"role": "user", "content": "  Hi  "}, {"role": "assistant", "content": "Hello!"}]
    assert skeletons.render(chat, False) == _render(tokenizer, chat) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>")
    assert not skeletons.enabled


# ---------------------------------------------------------------------------------------------
# Markers that cover more than the content: they decide the labels, as transformers' mask has it

MISTRAL_WITH_MARKERS = MISTRAL.replace(
    "{%- else -%}{{- message['content'] + eos_token -}}{%- endif -%}",
    "{%- else -%}{%- generation -%}{{- ' ' + message['content'] + eos_token -}}{%- endgeneration -%}{%- endif -%}")
CHATML_MARKED_HEADER = CHATML_WITH_MARKERS.replace(
    "{{- '<|im_start|>assistant\\n' -}}{%- generation -%}{{- message['content'] + '<|im_end|>' -}}",
    "{%- generation -%}{{- '<|im_start|>assistant\\n' + message['content'] + '<|im_end|>' -}}")
CHATML_MARKED_NEWLINE = CHATML_WITH_MARKERS.replace(
    "{{- message['content'] + '<|im_end|>' -}}{%- endgeneration -%}{{- '\\n' -}}",
    "{{- message['content'] + '<|im_end|>\\n' -}}{%- endgeneration -%}")
WIDE_MARKERS = {"mistral-leading-space": (MISTRAL_WITH_MARKERS, {"bos_token": "<s>", "eos_token": "</s>"}),
                "chatml-role-header": (CHATML_MARKED_HEADER, {}),
                "chatml-trailing-newline": (CHATML_MARKED_NEWLINE, {})}


@pytest.mark.parametrize("name", list(WIDE_MARKERS))
def test_markers_that_cover_content_and_end_of_turn_decide_the_labels(name, tmp_path, monkeypatch):
    """Where the marked span covers the content and its end-of-turn token plus more (a leading
    space, the role header, a newline), the labels are transformers' return_assistant_tokens_mask
    exactly, per conversation and through the batched dataset writer."""
    from steps.chat import renderer

    template, special = WIDE_MARKERS[name]
    assert template not in (MISTRAL, CHATML_WITH_MARKERS)
    tokenizer = byte_tokenizer(template, **special)
    conversations = [[dict(m, train=True) for m in messages] for messages in CONVERSATIONS
                     if messages[0]["role"] == "user" or "MISTRAL" not in name]
    # Contents whose first character does not merge with the space before it (byte tokenizer):
    # the content search alone would leave that space's token untrained.
    conversations += [[user("Hi"), assistant(content)] for content in ("42", "(yes)", "\nLine", "été")]
    alternating = [c for c in conversations if all(m["role"] == ("user", "assistant")[i % 2]
                                                   for i, m in enumerate(c))]
    for messages in alternating:
        _assert_labels_equal_assistant_mask(tokenizer, messages)
    monkeypatch.setattr(renderer._MarkerShortcut, "NUM_CHECKED", 2)  # trusted after two, as at scale
    shard = _write_data_shard(tmp_path / "a.parquet", alternating * 3)
    stats = tokenize_dataset(tokenizer, [shard], tmp_path / "tokens", max_seq_tokens=4096, truncation="drop")
    rows = pq.read_table(stats["uris"][0]).to_pylist()
    expected = [tokenizer.apply_chat_template([{"role": m["role"], "content": m["content"]} for m in messages],
                                              return_assistant_tokens_mask=True, return_dict=True)
                for messages in alternating * 3]
    documents = []
    for row in rows:
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["position_ids"])]
        documents += [(row["input_ids"][a:b], [int(label != -100) for label in row["labels"][a:b]])
                      for a, b in zip(starts, starts[1:])]
    assert len(documents) == len(expected) and sorted(documents) == sorted((ref["input_ids"], ref["assistant_masks"]) for ref in expected)


def test_markers_that_leave_the_end_of_turn_out_do_not_decide():
    content_only = CHATML_WITH_MARKERS.replace("message['content'] + '<|im_end|>' -}}{%- endgeneration -%}",
                                               "message['content'] -}}{%- endgeneration -%}{{- '<|im_end|>' -}}")
    tokenizer = byte_tokenizer(content_only)
    assert trained_runs(tokenizer, tokenize_conversation(tokenizer, TWO_TURNS)) == ["Fine.<|im_end|>"]
