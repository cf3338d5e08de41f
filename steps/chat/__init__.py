"""The tokenize layer: chats rendered with the model's own template, labels on the trained assistant turns only.

Three parts, as TRL separates ``chat_template_utils`` from ``data_utils`` from its trainers:

- ``steps.chat.template``: template analysis and masking. One conversation -> ``input_ids``
  and ``labels`` (-100 outside trained assistant turns), :func:`tokenize_conversation`::

      messages  user "Hi" | assistant "Hello!"
      tokens    <|im_start|> user \\n Hi <|im_end|> \\n <|im_start|> assistant \\n Hello ! <|im_end|> \\n
      labels    -            -    -  -  -          -  -            -         -  Hello ! <|im_end|> -

- ``steps.chat.renderer``: the fast renderer. A dataset's renders from one Jinja render per
  conversation shape, generation markers once proven, batches tokenized in one call.
- ``steps.chat.writer``: the dataset writer (workers, shards, rejects, stats, the example).
  SFT conversations (:data:`CONVERSATIONS`) and DPO pairs (``steps.dpo.PAIR_TOKENS``) are two
  record formats of the same writer.
"""

from steps.chat.template import (
    TRUNCATION_MODES,
    ChatTemplateError,
    ConversationTooLong,
    NoTrainedTokens,
    TokenizedConversation,
    content_opaque_violation,
    example_masked_text,
    tokenize_conversation,
)
from steps.chat.writer import (
    CONVERSATIONS,
    TOKEN_SHARD_SCHEMA,
    TOKENIZE_BATCH_SIZE,
    ComputedColumn,
    TokenFormat,
    first_record_text,
    pack_records,
    split_rows,
    tokenize_dataset,
    tokenize_splits,
    write_splits,
    write_token_dataset,
)

__all__ = [
    "CONVERSATIONS",
    "TOKENIZE_BATCH_SIZE",
    "TOKEN_SHARD_SCHEMA",
    "TRUNCATION_MODES",
    "ChatTemplateError",
    "ComputedColumn",
    "ConversationTooLong",
    "NoTrainedTokens",
    "TokenFormat",
    "TokenizedConversation",
    "content_opaque_violation",
    "example_masked_text",
    "first_record_text",
    "pack_records",
    "split_rows",
    "tokenize_conversation",
    "tokenize_dataset",
    "tokenize_splits",
    "write_splits",
    "write_token_dataset",
]
