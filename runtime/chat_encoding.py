"""Chat conversations to token ids, with message text never read as control tokens.

Rendering a conversation with the chat template and tokenising the result would parse a user's
``<|im_end|><|im_start|>system`` as the real control tokens: a user (or a document, or a tool result) could
close its own turn and open a system turn. :func:`encode_chat` renders the template around placeholders
instead, tokenises the template's own text normally (its control tokens are real) and each message's text
with special tokens split (``split_special_tokens=True``: the characters ``<|im_end|>`` become ordinary
tokens that spell them).

The message text is inserted as written; a template that transforms message text (trimming, say) does not
transform it here. Messages whose content is not a string (multimodal parts) are rendered by the template.
"""

from __future__ import annotations

import copy
import re
import threading
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["common_prefix_length", "encode_chat", "encode_chat_answer", "encode_text", "special_token_strings"]

_OPEN, _CLOSE = "\ue000", "\ue001"  # private-use characters: no tokenizer or user text gives them meaning
_PLACEHOLDER = re.compile(f"{_OPEN}(\\d+){_CLOSE}")


def special_token_strings(tokenizer: Any) -> list[str]:
    """The strings the tokenizer turns into special (control) tokens."""
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    strings = {token.content for token in decoder.values() if getattr(token, "special", False)}
    strings.update(getattr(tokenizer, "all_special_tokens", []) or [])
    return sorted(s for s in strings if s)


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """Token ids of untrusted text: special-token strings in it are spelled with ordinary tokens.

    Safe to call from many threads at once, beside other uses of ``tokenizer``."""
    splitting = _splitting_tokenizer(tokenizer)
    return list(splitting(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])


_SPLITTING: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()
_SPLITTING_LOCK = threading.Lock()


def _splitting_tokenizer(tokenizer: Any) -> Any:
    """A copy of ``tokenizer`` that always splits special tokens, made once per tokenizer.

    A fast tokenizer keeps "split special tokens" as state of its Rust tokenizer, and transformers sets that
    state at each call from the call's argument. Asking the shared tokenizer to split would, for the moment of
    the call, make a concurrent call on another thread (a chat template's own text, say) split its control
    tokens too, or this call parse the user's ``<|im_end|>`` as the real one. The copy's state never changes.
    """
    with _SPLITTING_LOCK:
        splitting = _SPLITTING.get(tokenizer)
        if splitting is None:
            splitting = copy.deepcopy(tokenizer)
            splitting.split_special_tokens = True
            backend = getattr(splitting, "_tokenizer", None)
            if backend is not None and hasattr(backend, "encode_special_tokens"):
                backend.encode_special_tokens = True
            _SPLITTING[tokenizer] = splitting
        return splitting


def encode_chat(
    tokenizer: Any, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True
) -> list[int]:
    """Token ids of a conversation rendered with ``tokenizer``'s chat template; no message text becomes a
    control token. Decoding the ids gives the same text as rendering the template."""
    contents: list[str] = []
    placeheld = []
    for message in messages:
        message = dict(message)
        content = message.get("content")
        if isinstance(content, str):
            message["content"] = f"{_OPEN}{len(contents)}{_CLOSE}"
            contents.append(content)
        placeheld.append(message)
    rendered = tokenizer.apply_chat_template(placeheld, tokenize=False, add_generation_prompt=add_generation_prompt)
    ids: list[int] = []
    position = 0
    for match in _PLACEHOLDER.finditer(rendered):
        ids += tokenizer(rendered[position : match.start()], add_special_tokens=False)["input_ids"]
        ids += encode_text(tokenizer, contents[int(match.group(1))])
        position = match.end()
    ids += tokenizer(rendered[position:], add_special_tokens=False)["input_ids"]
    return ids


def encode_chat_answer(tokenizer: Any, messages: Sequence[Mapping[str, Any]], answer: str) -> tuple[list[int], int]:
    """Token ids of `messages` answered by an assistant turn holding `answer` (:func:`encode_chat`), and the index
    where the answer's tokens start: after the longest prefix shared with the prompt and its generation prompt."""
    prompt = encode_chat(tokenizer, messages, add_generation_prompt=True)
    full = encode_chat(tokenizer, [*messages, {"role": "assistant", "content": answer}], add_generation_prompt=False)
    return full, common_prefix_length(prompt, full)


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading ids two token sequences share (where a prompt's tokens end in prompt + answer)."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
