"""The tiny base model: a ~2M-parameter Llama and a 2048-token BPE, built offline.

The build needs no network and is bit-reproducible: the tokenizer is trained on a
fixed sample of the catalog conversations, and the weights are initialised under
``torch.manual_seed(seed)``. It takes a couple of seconds on a laptop CPU.

The folder it writes is an ordinary Hugging Face model folder::

    dest/
      config.json  generation_config.json  model.safetensors
      tokenizer.json  tokenizer_config.json  chat_template.jinja
      BUILD_COMPLETE          written last; holds BUILD_VERSION and the seed

Chat format (ChatML), one line per message, the assistant part marked for
``return_assistant_tokens_mask``::

    <|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\nHello<|im_end|>\\n
                                                    ^^^^^^^^^^^^^^^^ trained tokens
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

BUILD_VERSION = "tiny-llama-v1"
"""Bump when the build output changes, so stale caches are rebuilt."""
MARKER_FILE = "BUILD_COMPLETE"

PAD_TOKEN = "<|endoftext|>"
IM_START_TOKEN = "<|im_start|>"
IM_END_TOKEN = "<|im_end|>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD_TOKEN, IM_START_TOKEN, IM_END_TOKEN)
VOCAB_SIZE = 2048
"""Total vocabulary, special and reserved tokens included."""

# Model shapes. The student (``builtin:tiny-llama-student``) is the distillation default: about
# 3x fewer parameters, and the same tokenizer, so it can learn from tiny-llama's logits.
TINY_LLAMA_SIZE = {"hidden_size": 192, "intermediate_size": 512, "num_hidden_layers": 4,
                   "num_attention_heads": 6, "num_key_value_heads": 2}
STUDENT_SIZE = {"hidden_size": 128, "intermediate_size": 320, "num_hidden_layers": 2,
                "num_attention_heads": 4, "num_key_value_heads": 2}

# The tokenizer corpus does not depend on the build seed: models built with
# different seeds share one tokenizer, so token shards stay interchangeable.
TOKENIZER_CORPUS_SEED = 0
NUM_TOKENIZER_CONVERSATIONS = 3000

# ChatML. The assistant content and its <|im_end|> sit inside {% generation %} so
# transformers can return the assistant-token mask; the "\n" after <|im_end|> is
# outside it, because the model stops at <|im_end|> and never has to produce it.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant', 'tool'] -%}"
    "{{- raise_exception('Unknown role: ' + message['role']) -}}"
    "{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- generation -%}"
    "{{- message['content'] + '<|im_end|>' -}}"
    "{%- endgeneration -%}"
    "{{- '\\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- endif -%}"
)


def _marker_text(seed: int) -> str:
    return f"{BUILD_VERSION} seed={seed}\n"


def is_complete_build(path: Path, *, seed: int = 0) -> bool:
    """True when ``path`` holds a finished build of this version and seed."""
    marker = Path(path) / MARKER_FILE
    try:
        return marker.read_text() == _marker_text(seed)
    except OSError:
        return False


def _tokenizer_corpus() -> Iterator[str]:
    from steps.builtin.catalog import catalog_as_text, generate_conversations

    yield catalog_as_text()
    for record in generate_conversations(NUM_TOKENIZER_CONVERSATIONS, seed=TOKENIZER_CORPUS_SEED):
        # Role names are trained as words too: they follow <|im_start|> in every message.
        yield "".join(f"{m['role']}\n{m['content']}\n" for m in record["messages"])


def build_tokenizer():
    """Train the byte-level BPE and wrap it as a ``PreTrainedTokenizerFast``.

    The catalog's language is small, so BPE runs out of merges (every word becomes
    one token) well before 2048 entries; the rest are ``<|reserved_N|>`` special
    tokens, as in Llama 3, so the embedding size is the round number we promise.

    Example:
        >>> tokenizer = build_tokenizer()
        >>> len(tokenizer), tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
        (2048, [0, 1, 2])
        >>> tokenizer.decode(tokenizer("Any text, even ünïcödé!")["input_ids"])
        'Any text, even ünïcödé!'
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    # ByteLevel: every string maps to bytes, so nothing is ever <unk> and decode
    # round-trips exactly. No prefix space: "\n" + content must not change content.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    backend.train_from_iterator(_tokenizer_corpus(), trainer)
    num_reserved = VOCAB_SIZE - backend.get_vocab_size()
    if num_reserved < 0:
        raise RuntimeError(f"BPE produced {backend.get_vocab_size()} tokens, more than {VOCAB_SIZE}")
    backend.add_special_tokens([AddedToken(f"<|reserved_{i}|>", special=True) for i in range(num_reserved)])

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=IM_END_TOKEN,
        pad_token=PAD_TOKEN,
        chat_template=CHAT_TEMPLATE,
        model_max_length=1024,
        clean_up_tokenization_spaces=False,
    )
    return tokenizer


def _build_model(tokenizer, seed: int, size: dict):
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        **size,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    # fork_rng: the constructor's own random init must not move the caller's stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    # Re-draw every weight from a private generator, the way Llama initialises them
    # (normal(0, initializer_range) matrices, unit norm scales, zero pad embedding).
    # The global RNG is shared by all threads, so two builds running in threads of
    # one process would interleave their draws; a private generator cannot.
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():  # a tied weight is listed once
            if parameter.ndim == 1:
                parameter.fill_(1.0)
            else:
                parameter.normal_(0.0, config.initializer_range, generator=generator)
        model.get_input_embeddings().weight[tokenizer.pad_token_id].zero_()
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return model


def _check_chat_template(tokenizer) -> None:
    # A template whose markers were split into several ids would silently train a
    # different format; fail the build instead.
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    im_start, im_end = tokenizer.convert_tokens_to_ids([IM_START_TOKEN, IM_END_TOKEN])
    if ids.count(im_start) != 2 or ids.count(im_end) != 2:
        raise RuntimeError(f"chat markers are not single tokens: {tokenizer.convert_ids_to_tokens(ids)}")


def _write_build(folder: Path, seed: int, size: dict) -> None:
    from steps.models import save_model

    tokenizer = build_tokenizer()
    _check_chat_template(tokenizer)
    model = _build_model(tokenizer, seed, size)
    tokenizer.save_pretrained(folder)
    save_model(model, folder)
    (folder / MARKER_FILE).write_text(_marker_text(seed))


def build_tiny_llama(dest: Path, *, seed: int = 0, size: dict | None = None) -> Path:
    """Build the tiny Llama into ``dest`` (once) and return ``dest``.

    The build goes into a temporary sibling folder that is renamed onto ``dest``
    only when complete, so ``dest`` is either absent or whole. If ``dest`` already
    holds a complete build with this version and seed it is returned untouched.
    When two processes race, the loser of the rename keeps the winner's folder.

    Example:
        >>> import tempfile
        >>> from transformers import AutoModelForCausalLM
        >>> folder = build_tiny_llama(Path(tempfile.mkdtemp()) / "tiny")
        >>> model = AutoModelForCausalLM.from_pretrained(folder)
        >>> model.config.hidden_size, model.num_parameters()
        (192, 1967808)

    ``size`` overrides the shape (``TINY_LLAMA_SIZE``); see :func:`build_tiny_llama_student`.
    """
    dest = Path(dest)
    if is_complete_build(dest, seed=seed):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = dest.parent / f".{dest.name}.building-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        _write_build(staging, seed, size or TINY_LLAMA_SIZE)
        if dest.exists() and not is_complete_build(dest, seed=seed):
            # A stale or foreign build (older version, other seed): move it aside
            # with one rename, so readers never see a half-deleted folder.
            stale = dest.parent / f".{dest.name}.stale-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            try:
                os.replace(dest, stale)
            except FileNotFoundError:
                pass  # someone else moved it already
            else:
                shutil.rmtree(stale, ignore_errors=True)
        try:
            os.replace(staging, dest)
        except OSError:
            # dest appeared meanwhile (ENOTEMPTY/EEXIST): another process won the race.
            if not is_complete_build(dest, seed=seed):
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return dest


def build_tiny_llama_student(dest: Path, *, seed: int = 0) -> Path:
    """Build the distillation student into ``dest`` (once): tiny-llama's tokenizer, a smaller body.

    Example:
        >>> import tempfile
        >>> from transformers import AutoModelForCausalLM
        >>> folder = build_tiny_llama_student(Path(tempfile.mkdtemp()) / "student")
        >>> model = AutoModelForCausalLM.from_pretrained(folder)
        >>> model.config.hidden_size, model.config.num_hidden_layers, model.num_parameters()
        (128, 2, 606848)
    """
    return build_tiny_llama(dest, seed=seed, size=STUDENT_SIZE)
