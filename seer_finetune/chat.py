"""Conversations in, token ids with assistant-only targets out.

A row becomes a conversation (`chat_rows`): a list of `{role, content}` messages from `data.messages_field`, or
one user prompt and one assistant answer from `data.prompt_field` / `data.response_field`. `ChatEncoder` renders
it through the tokenizer's own chat template and marks which tokens are targets.

Which tokens are the assistant's:
- a template with `{% generation %}` blocks: the tokens transformers marks (`return_assistant_tokens_mask`);
- any other template, by rendering incrementally: for each assistant message i, the text the template renders
  for messages[:i] with the generation prompt must be a prefix of what it renders for messages[:i+1], which must
  be a prefix of the whole conversation's text. What message i adds past the generation prompt (its content and
  the end-of-turn marker, trailing whitespace left out) is the assistant's span. The whole conversation is
  tokenised once, as the model reads it at inference, and a token is a target when its first character lies in
  an assistant span. A template for which the prefixes do not hold is refused in one line (give it generation
  blocks).
So the role headers, the user's and system's messages and the generation prompt are never targets; the answer and
its end-of-turn token are.

A conversation longer than the sequence length (`data.chat_overflow`): `truncate` cuts tokens out of the middle of
its longest user message (its start and end stay, so an instruction before a document and a question after it
both survive), again until the whole fits; assistant messages are never cut. When no user text is left to cut,
or with `drop`, the conversation is left out and counted. A conversation with no target token is left out too.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from .config import ConfigError
from .sources import RowSchema

GENERATION_BLOCK = re.compile(r"\{%-?\s*generation\s*-?%\}")
ASSISTANT = "assistant"
# Rounds of cutting a long user message: each removes what is still too long, measured on the re-rendered text.
MAX_TRUNCATION_ROUNDS = 8


def _messages(value: Any, field: str) -> tuple[list[dict] | None, str | None]:
    """(messages, None), (None, None) for an empty conversation, or (None, problem)."""
    if value is None or (isinstance(value, list) and not value):
        return None, None
    where = f"data.messages_field {field!r}"
    if not isinstance(value, list):
        return None, f"{where} is not a list of {{role, content}} messages"
    messages = []
    for i, message in enumerate(value, start=1):
        if not isinstance(message, dict):
            return None, f"{where}: message {i} is not an object with role and content"
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not role:
            return None, f"{where}: message {i} has no role string"
        if not isinstance(content, str) or "\x00" in content:
            return None, f"{where}: message {i} has no content string"
        messages.append({"role": role, "content": content})
    if not any(m["role"] == ASSISTANT and m["content"] for m in messages):
        return None, f"{where}: no assistant message to train on"
    return messages, None


def chat_rows(messages_field: str = "messages", prompt_field: str | None = None, response_field: str | None = None) -> RowSchema:
    """Rows that hold a conversation.

    Args:
        messages_field: The column with a list of `{role, content}` (used when no prompt field is given).
        prompt_field: The column with the user's prompt, or None.
        response_field: The column with the assistant's answer (with `prompt_field`).

    Returns:
        The schema: each document is a list of `{"role", "content"}` dicts with at least one non-empty assistant
        message; rows without one, or with malformed messages, are invalid rows (`data.invalid_files`).
    """
    if prompt_field is not None:

        def convert_pair(row: dict) -> tuple[Any, str | None]:
            prompt, response = row.get(prompt_field), row.get(response_field)
            if prompt is None and response is None:
                return None, None
            for name, value in (("data.prompt_field", prompt), ("data.response_field", response)):
                if not isinstance(value, str) or not value or "\x00" in value:
                    field = prompt_field if name == "data.prompt_field" else response_field
                    return None, f"{name} {field!r} is not a non-empty string"
            return [{"role": "user", "content": prompt}, {"role": ASSISTANT, "content": response}], None

        return RowSchema(
            (prompt_field, response_field), convert_pair, "prompt and response fields",
            "set data.prompt_field and data.response_field", "that are not a prompt and a response", text_files=False,
        )

    def convert(row: dict) -> tuple[Any, str | None]:
        return _messages(row.get(messages_field), messages_field)

    return RowSchema(
        (messages_field,), convert, "messages field",
        "set data.messages_field (or data.prompt_field and data.response_field)", "that are not conversations",
        text_files=False,
    )


class ChatEncoder:
    """Token ids and target mask of conversations, through the tokenizer's chat template (see the module
    docstring for the rule).

    Args:
        tokenizer: A fast tokenizer with a chat template.
        max_len: Longest encoding kept (the sequence length).
        overflow: `truncate` or `drop` for a longer conversation.

    Attributes:
        truncated: Conversations cut to fit so far.
        dropped: Conversations left out so far (too long to cut, or no target token).
    """

    def __init__(self, tokenizer, max_len: int, overflow: str = "truncate"):
        template = getattr(tokenizer, "chat_template", None)
        if not template:
            name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
            raise ConfigError(
                f"data.format=chat needs a tokenizer with a chat template; {name!r} has none (set model.tokenizer to "
                "the instruct model's tokenizer, or add a chat_template to its tokenizer_config.json)"
            )
        if not getattr(tokenizer, "is_fast", False):
            raise ConfigError("data.format=chat needs a fast tokenizer (character offsets mark the assistant's tokens)")
        if overflow not in ("truncate", "drop"):
            raise ConfigError(f"data.chat_overflow={overflow!r} is not one of truncate, drop")
        self.tokenizer, self.max_len, self.overflow = tokenizer, max_len, overflow
        self.generation_blocks = bool(GENERATION_BLOCK.search(template if isinstance(template, str) else str(template)))
        self.truncated = self.dropped = 0

    def render(self, messages: list[dict], generation_prompt: bool = False) -> str:
        """The template's text of `messages` (with the assistant's generation prompt after them when asked)."""
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def assistant_spans(self, messages: list[dict], text: str) -> list[tuple[int, int]]:
        """Character spans of the assistant's messages in `text` (the rendering of `messages`), found by
        rendering incrementally.

        Raises:
            ConfigError: the template does not render conversations as prefixes of each other.
        """
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != ASSISTANT:
                continue
            before = self.render(messages[:i], generation_prompt=True) if i else self._empty_prompt()
            through = self.render(messages[: i + 1])
            if not through.startswith(before) or not text.startswith(through):
                raise ConfigError(
                    "data.format=chat: the tokenizer's chat template does not render a conversation as a prefix of "
                    f"its continuation (at message {i + 1}), so the assistant's tokens cannot be told apart; use a "
                    "template that marks them with {% generation %} ... {% endgeneration %}"
                )
            spans.append((len(before), max(len(before), len(through.rstrip()))))
        return spans

    def _empty_prompt(self) -> str:
        try:
            return self.render([], generation_prompt=True)
        except Exception:  # templates may index messages[0]; a conversation opened by the assistant has no prefix
            return ""

    def tokens_and_mask(self, messages: list[dict]) -> tuple[np.ndarray, np.ndarray]:
        """(int32 token ids, bool target mask) of a conversation, not truncated."""
        if self.generation_blocks:
            out = self.tokenizer.apply_chat_template(
                messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
            )
            return np.asarray(out["input_ids"], dtype=np.int32), np.asarray(out["assistant_masks"], dtype=bool)
        text = self.render(messages)
        spans = self.assistant_spans(messages, text)
        encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = np.asarray(encoded["input_ids"], dtype=np.int32)
        starts = np.asarray([start for start, _ in encoded["offset_mapping"]], dtype=np.int64)
        mask = np.zeros(len(ids), dtype=bool)
        for start, end in spans:
            mask |= (starts >= start) & (starts < end)
        return ids, mask

    def encode(self, messages: list[dict]) -> tuple[np.ndarray, np.ndarray] | None:
        """(int32 ids, bool targets) of a conversation of at most `max_len` tokens, or None when it is left out.

        Args:
            messages: `{role, content}` dicts (as `chat_rows` gives them).

        Returns:
            The encoding, cut to fit under `truncate`; None (counted in `dropped`) when it cannot fit or has no
            target after its first token.
        """
        ids, mask = self.tokens_and_mask(messages)
        if len(ids) > self.max_len:
            fitted = self._truncate(messages, len(ids)) if self.overflow == "truncate" else None
            if fitted is None:
                self.dropped += 1
                return None
            ids, mask = fitted
            self.truncated += 1
        # The first token of a sequence is never predicted: a target must come after it.
        if not mask[1:].any():
            self.dropped += 1
            return None
        return ids, mask

    def _truncate(self, messages: list[dict], length: int) -> tuple[np.ndarray, np.ndarray] | None:
        messages = [dict(m) for m in messages]
        for _ in range(MAX_TRUNCATION_ROUNDS):
            excess = length - self.max_len
            users = [i for i, m in enumerate(messages) if m["role"] == "user" and m["content"]]
            if not users:
                return None
            longest = max(users, key=lambda i: len(messages[i]["content"]))
            content = messages[longest]["content"]
            offsets = self.tokenizer(content, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
            if excess >= len(offsets):
                messages[longest]["content"] = ""
            else:
                # Keep as many tokens before the cut as after it.
                head = (len(offsets) - excess) // 2
                tail = head + excess
                end = offsets[tail][0] if tail < len(offsets) else len(content)
                messages[longest]["content"] = content[: offsets[head][0]] + content[end:]
            ids, mask = self.tokens_and_mask(messages)
            length = len(ids)
            if length <= self.max_len:
                return ids, mask
        return None


def labels_from_mask(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """int64 labels: the token id where `mask` is set, -100 (ignored by the loss) elsewhere."""
    return np.where(mask, ids.astype(np.int64), -100)
