"""The one conversation form every stage uses, and the rules that bring seed data into it.

A conversation row is ``{"id": str, "messages": [{"role": ..., "content": str}, ...]}`` with
roles ``system`` | ``user`` | ``assistant``. After `normalize_messages` a conversation is:

- at most one ``system`` message, and only as the first message;
- then turns that strictly alternate, starting with ``user`` (it may end with either role: a
  trailing user turn is a prompt still waiting for its reply).

Decisions for the irregular rows found in real seed data (ShareGPT V3 has all of them):

- **Leading assistant turns** (6,358 ShareGPT conversations are the continuation of a split
  conversation and start with ``gpt``) are dropped: there is no prompt they answer, and the rest
  of the conversation is still good seed data.
- **Consecutive turns of the same role** are merged into one, joined by a blank line, because
  most chat templates (Gemma's raises) require strict alternation.
- **Empty or whitespace-only turns** carry nothing and are dropped before merging.
- A row that is left without a user turn is rejected (``no_user_turn``).

Malformed rows raise `MalformedRow` with a short reason key, so loaders can skip and count them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# Every role name seen in ShareGPT-style data and chat datasets, mapped to the one form.
ROLE_ALIASES: dict[str, str] = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "assistant": "assistant",
    "model": "assistant",
}

# Reason keys a loader may count (documented here so reports and tests share one list).
REASONS = (
    "invalid_json",
    "not_an_object",
    "missing_field",
    "empty_conversation",
    "non_string_content",
    "unknown_role",
    "misplaced_system",
    "no_user_turn",
)


class MalformedRow(ValueError):
    """A seed row that cannot be brought into the conversation form; `reason` is a short key."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def _turn_role_content(turn: Any) -> tuple[Any, Any]:
    """Read one turn in either ShareGPT (`from`/`value`) or chat (`role`/`content`) keys."""
    if not isinstance(turn, Mapping):
        raise MalformedRow("not_an_object", f"a turn must be an object, got {type(turn).__name__}")
    if "from" in turn and "value" in turn:
        return turn["from"], turn["value"]
    if "role" in turn and "content" in turn:
        return turn["role"], turn["content"]
    raise MalformedRow(
        "missing_field", f"a turn needs 'from'/'value' or 'role'/'content', got {sorted(turn)}"
    )


def normalize_messages(turns: Any) -> list[dict[str, str]]:
    """Bring a list of turns (ShareGPT or chat keys, any known role name) into the one form.

    Raises `MalformedRow` when the row cannot be used; see the module docstring for the rules.
    """
    if not isinstance(turns, list):
        raise MalformedRow("missing_field", f"turns must be a list, got {type(turns).__name__}")
    if not turns:
        raise MalformedRow("empty_conversation")
    messages: list[dict[str, str]] = []
    for position, turn in enumerate(turns):
        raw_role, content = _turn_role_content(turn)
        if not isinstance(raw_role, str) or raw_role.strip().lower() not in ROLE_ALIASES:
            raise MalformedRow(
                "unknown_role", f"{raw_role!r}; allowed: {', '.join(sorted(ROLE_ALIASES))}"
            )
        if not isinstance(content, str):
            raise MalformedRow("non_string_content", f"turn {position}: {type(content).__name__}")
        role = ROLE_ALIASES[raw_role.strip().lower()]
        if role == "system" and position != 0:
            raise MalformedRow("misplaced_system", f"system message at turn {position}")
        if not content.strip():
            continue
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"] += "\n\n" + content
        else:
            messages.append({"role": role, "content": content})

    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    turns_only = messages[len(system) :]
    while turns_only and turns_only[0]["role"] == "assistant":
        turns_only.pop(0)
    if not turns_only:
        raise MalformedRow("no_user_turn")
    return system + turns_only
