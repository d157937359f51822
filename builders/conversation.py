"""Prompts that are conversations: the OpenAI/TRL message list (an optional leading system message, then user and
assistant turns alternating, ending with a user turn), its canonical form and id, and how each stage sees it.

A prompt is either a string or a conversation. A string keeps its id, sha256 of the stripped text; a conversation's
id is the sha256 of its canonical serialisation (`conversation_id`), which no string's id can equal. A
conversation of one user turn and no system message is that turn's string (same id, same row), so the two forms of
the same prompt never make two prompts. The catalog's prompts row holds, for a conversation, the last user turn in
`prompt` (what text-only readers and the `default` published config show) and the whole conversation in
`messages` (null for a string prompt, whose row and row hash are then those of iterdpo before conversations).

    >>> conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Hi "}]
    >>> canonical(conv)
    [{'content': 'Be brief.', 'role': 'system'}, {'content': 'Hi', 'role': 'user'}]
    >>> canonical([{"role": "user", "content": "Hi"}])  # one user turn is the string prompt
    'Hi'
    >>> conversation_id(canonical(conv)) == conversation_id([["system", "Be brief."], ["user", "Hi"]])
    True
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from builders.errors import InputError

ROLES = ("system", "user", "assistant")
# the byte before a conversation's serialisation: 0xFF occurs in no UTF-8 text, so no string prompt's bytes
# (hence id) can be a conversation's
CONVERSATION_MARK = b"\xff"

Message = dict[str, str]
Prompt = str | list[Message]


def canonical(messages: Any, where: str = "conversation") -> Prompt | None:
    """A conversation as stored: every message {content, role} with the content stripped; a single user turn as
    its string; None for an empty conversation (null or []). A malformed one is an InputError naming `where`."""
    if messages is None:
        return None
    if isinstance(messages, str):
        return messages.strip() or None
    if not isinstance(messages, (list, tuple)):
        raise InputError(
            f"{where}: a conversation is a list of {{role, content}} messages, not {type(messages).__name__}"
        )
    if not messages:
        return None
    out: list[Message] = []
    for i, m in enumerate(messages, start=1):
        if not isinstance(m, dict):
            raise InputError(f"{where}: message {i} is a {type(m).__name__}, not a {{role, content}} object")
        extra = sorted(k for k, v in m.items() if k not in ("role", "content") and v is not None)
        if extra:
            raise InputError(f"{where}: message {i} has keys other than role and content ({', '.join(extra)})")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise InputError(f"{where}: message {i} has an unknown role {role!r}; roles are {', '.join(ROLES)}")
        if not isinstance(content, str) or not content.strip():
            raise InputError(f"{where}: message {i} ({role}) has no text content")
        if role == "system" and i != 1:
            raise InputError(f"{where}: message {i} is a system message; only the first message may be one")
        out.append({"content": content.strip(), "role": role})
    turns = out[1:] if out[0]["role"] == "system" else out
    if not turns:
        raise InputError(f"{where}: a system message alone is no prompt; the conversation needs a user turn")
    for i, m in enumerate(turns):
        want = "user" if i % 2 == 0 else "assistant"
        if m["role"] != want:
            at = i + 1 + (len(out) - len(turns))
            raise InputError(f"{where}: message {at} is {m['role']}, not {want}: turns alternate user/assistant")
    if turns[-1]["role"] != "user":
        raise InputError(f"{where}: the conversation ends with an assistant turn; a prompt ends with a user turn")
    if len(out) == 1:
        return out[0]["content"]
    return out


def conversation_id(messages: Sequence[Message] | Sequence[Sequence[str]]) -> str:
    """sha256 hex of 0xFF followed by the UTF-8 JSON array of [role, content] pairs of the canonical conversation
    (compact separators, non-ASCII kept as is)."""
    pairs = [[m["role"], m["content"]] if isinstance(m, dict) else [m[0], m[1]] for m in messages]
    text = json.dumps(pairs, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(CONVERSATION_MARK + text.encode("utf-8")).hexdigest()


def messages_of(prompts: Any) -> list[list[Message] | None]:
    """Each row's conversation (None for a string prompt) of a prompts table; a table of string prompts has no
    `messages` column (a snapshot read leaves an all-null optional column out)."""
    if "messages" not in prompts.column_names:
        return [None] * prompts.num_rows
    return prompts.column("messages").to_pylist()


def last_user_turn(prompt: Prompt) -> str:
    return prompt if isinstance(prompt, str) else prompt[-1]["content"]


def as_messages(prompt: Prompt) -> list[Message]:
    """The message list a chat template or a chat API takes."""
    if isinstance(prompt, str):
        return [{"content": prompt, "role": "user"}]
    return [dict(m) for m in prompt]


def effective(prompt: str, messages: Sequence[Message] | None, system_prompt: str | None) -> Prompt:
    """What the model is asked: the row's conversation (or its string), with `system_prompt` first unless the
    conversation has its own system message (the row's own wins). A string prompt without a system prompt stays
    a string, so everything downstream of it is what it was before conversations."""
    conv: list[Message] | None = [dict(m) for m in messages] if messages else None
    if not system_prompt:
        return conv if conv is not None else prompt
    conv = conv if conv is not None else [{"content": prompt, "role": "user"}]
    if conv[0]["role"] == "system":
        return conv
    return [{"content": system_prompt, "role": "system"}, *conv]


def has_own_system(messages: Sequence[Message] | None) -> bool:
    return bool(messages) and messages[0]["role"] == "system"


def resolve_system_prompt(value: str | None) -> str | None:
    """`--system-prompt TEXT_OR_@FILE`: the text, or the file's text for @FILE (stripped); None or blank: none."""
    if value is None:
        return None
    if value.startswith("@"):
        path = Path(value[1:]).expanduser()
        try:
            value = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            reason = e.strerror if isinstance(e, OSError) else "not UTF-8 text"
            raise InputError(f"system_prompt {path}: {reason}", option="system_prompt") from None
        if not value.strip():
            raise InputError(f"system_prompt {path}: the file is empty", option="system_prompt")
    return value.strip() or None


# ---------------------------------------------------------------------------------------------------- rendering
_LABELS = {"system": "SYSTEM", "user": "USER", "assistant": "Assistant"}  # llm-blender's USER/Assistant lines


def render_lines(prompt: Prompt) -> list[str]:
    """One line per message ("USER: ...", "Assistant: ...", "SYSTEM: ..."), as llm-blender writes a conversation."""
    return [f"{_LABELS[m['role']]}: {m['content']}" for m in as_messages(prompt)]


def fit_history(prompt: Prompt, length: Callable[[str], int], budget: int) -> str:
    """A reward model's source text for `prompt`: a string as it is; a conversation as its rendered lines, the
    oldest dropped first (the system message counts as the oldest) until `length(text)` fits `budget`. The last
    user turn is always kept (the model's own truncation cuts it only if it alone is longer than the budget)."""
    if isinstance(prompt, str):
        return prompt
    lines = render_lines(prompt)
    for start in range(len(lines)):
        text = "\n".join(lines[start:])
        if start == len(lines) - 1 or length(text) <= budget:
            return text
    return lines[-1]
