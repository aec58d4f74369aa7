"""Chat template rendering and the assistant loss mask.

The mask is computed by rendering prefixes with the tokenizer's own template: for assistant turn i, the
text of messages[:i] with the generation prompt ends where the reply starts, and the text of
messages[:i+1] (right-stripped) ends where the reply's end-of-turn marker ends. Tokens whose character
offset falls in such a span are trained on; that works for any template whose renderings are prefixes of
one another (ChatML, Llama 3, ...). Templates that rewrite earlier turns fall back to finding the reply
text in the full rendering.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from jinja2.exceptions import TemplateError

from dataflow.errors import InputError
from dataflow.rollout.data import Conversation

UNRENDERABLE = (TemplateError, ValueError)  # what a chat template raises for a conversation it refuses


@dataclass(frozen=True)
class TokenizedSample:
    id: str
    input_ids: list[int]
    loss_mask: list[bool]


def set_chat_template(tokenizer, model_dir: Path, chat_template: str | None) -> None:
    """Install `chat_template` (a file path or a Jinja string) or check the tokenizer has one."""
    if chat_template and ("{{" in chat_template or "{%" in chat_template):
        tokenizer.chat_template = chat_template
    elif chat_template:
        try:
            tokenizer.chat_template = Path(chat_template).read_text()
        except OSError as e:
            raise InputError(f"--chat-template {chat_template}: cannot read it ({e.strerror}); pass a Jinja file")
    if not getattr(tokenizer, "chat_template", None):
        raise InputError(
            f"target model {model_dir}: its tokenizer has no chat template; pass --chat-template FILE (Jinja)"
        )
    if not getattr(tokenizer, "is_fast", False):
        raise InputError(f"target model {model_dir}: a fast tokenizer (tokenizer.json) is needed for the loss mask")


def render(tokenizer, messages, add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_spans(tokenizer, messages, only_last: bool = False) -> tuple[str, list[tuple[int, int]]]:
    """The full rendering and the [start, end) character spans of the assistant replies in it."""
    full = render(tokenizer, messages)
    spans = []
    cursor = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = render(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        upto = render(tokenizer, messages[: i + 1]).rstrip()
        if i and full.startswith(upto) and upto.startswith(prefix) and len(upto) > len(prefix):
            span = (len(prefix), len(upto))
        else:  # the template rewrites earlier turns: find the reply text itself
            content = message["content"].strip()
            start = full.find(content, cursor)
            if not content or start < 0:
                continue
            span = (start, start + len(content))
        spans.append(span)
        cursor = span[1]
    return full, spans[-1:] if only_last else spans


def tokenize_sample(
    tokenizer, sample: Conversation, *, max_length: int, train_only_last_turn: bool = False
) -> TokenizedSample | None:
    """input_ids and the assistant loss mask, truncated together; None if no assistant token is left."""
    if sample.text is not None:
        input_ids = tokenizer(sample.text, add_special_tokens=True)["input_ids"]
        mask = [True] * len(input_ids)
    else:
        text, spans = assistant_spans(tokenizer, sample.messages, only_last=train_only_last_turn)
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        input_ids = encoded["input_ids"]
        mask = [any(s <= start < e for s, e in spans) for start, _ in encoded["offset_mapping"]]
    input_ids, mask = input_ids[:max_length], mask[:max_length]
    if not any(mask):
        return None
    return TokenizedSample(sample.id, input_ids, mask)
