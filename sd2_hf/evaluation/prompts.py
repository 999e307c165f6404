"""Evaluation prompts: questions from MT-Bench or a conversation dataset, rendered with the
target's chat template into token ids, so every backend and drafter sees identical prompts."""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from sd2_hf.evaluation.config import EvalConfig


@dataclass
class Question:
    """A conversation to evaluate: its user turns, in order, and an optional system prompt."""

    id: str
    category: str
    turns: list[str]
    system: str | None = None


@dataclass
class Prompt:
    """One rendered prompt: the conversation up to a user turn, with the generation prompt."""

    id: str
    category: str
    turn: int
    input_ids: list[int]
    truncated: bool = False


@dataclass
class PromptCounts:
    """What happened to the questions' turns (so the report accounts for every one)."""

    questions: int = 0
    evaluated: int = 0
    truncated: int = 0
    skipped: dict[str, int] = field(default_factory=dict)

    def skip(self, reason: str, n: int = 1) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + n


def _looks_like_mtbench(source: str) -> bool:
    if source.startswith("asset:mtbench"):
        return True
    path = Path(source)
    if path.suffix != ".jsonl" or not path.is_file():
        return False
    with path.open(encoding="utf-8") as f:
        first = f.readline()
    try:
        row = json.loads(first)
    except json.JSONDecodeError:
        return False
    return isinstance(row, dict) and "turns" in row


def _spread(questions: list[Question], limit: int | None) -> list[Question]:
    """At most `limit` questions, taken round-robin over categories (MT-Bench is sorted by
    category, so a plain prefix would cover one or two categories only)."""
    if limit is None or limit >= len(questions):
        return questions
    by_category: dict[str, list[Question]] = defaultdict(list)
    for q in questions:
        by_category[q.category].append(q)
    picked: list[Question] = []
    rank = 0
    while len(picked) < limit:
        for group in by_category.values():
            if rank < len(group) and len(picked) < limit:
                picked.append(group[rank])
        rank += 1
    order = {id(q): i for i, q in enumerate(questions)}
    return sorted(picked, key=lambda q: order[id(q)])


def load_questions(config: EvalConfig) -> tuple[list[Question], dict[str, int]]:
    """The questions of `config.prompts` (limited, spread over categories) and the loader's
    skipped-row counts."""
    fmt = config.prompts_format
    if fmt == "auto":
        fmt = "mtbench" if _looks_like_mtbench(config.prompts) else "conversations"
    if fmt == "mtbench":
        from sd2_hf.data.loaders import load_mtbench

        rows = load_mtbench(config.prompts)
        questions = [Question(str(r["id"]), str(r["category"]), list(r["turns"])) for r in rows]
        skipped: dict[str, int] = {}
    else:
        from sd2_hf.data.loaders import load_conversations

        result = load_conversations(config.prompts)
        questions = []
        for row in result.rows:
            messages = row["messages"]
            system = messages[0]["content"] if messages[0]["role"] == "system" else None
            turns = [m["content"] for m in messages if m["role"] == "user"]
            questions.append(Question(str(row["id"]), "all", turns, system))
        skipped = dict(result.skipped)
    questions = questions[config.offset :]
    if not questions:
        raise ValueError(
            f"no usable prompts in {config.prompts!r} from row {config.offset} on "
            f"(skipped rows: {skipped})"
        )
    if config.prompts_match is not None:
        pattern = re.compile(config.prompts_match, re.IGNORECASE)
        questions = [q for q in questions if pattern.search(q.turns[0])]
        if not questions:
            raise ValueError(
                f"no question of {config.prompts!r} from row {config.offset} on has a first "
                f"turn matching prompts_match {config.prompts_match!r}"
            )
    return _spread(questions, config.limit), skipped


def conversation(question: Question, turn: int, replies: list[str]) -> list[dict[str, str]]:
    """Messages up to user turn `turn`, earlier turns answered by `replies`."""
    messages = [{"role": "system", "content": question.system}] if question.system else []
    for i in range(turn):
        messages += [
            {"role": "user", "content": question.turns[i]},
            {"role": "assistant", "content": replies[i]},
        ]
    messages.append({"role": "user", "content": question.turns[turn]})
    return messages


def render(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of `messages` with the tokenizer's chat template and generation prompt."""
    if not tokenizer.chat_template:
        raise ValueError(
            f"the target tokenizer ({tokenizer.name_or_path}) has no chat template; evaluation "
            "renders prompts with the target's chat template, so use an instruct/chat model or "
            "set `tokenizer.chat_template` and save it with the model"
        )
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # The template already writes any BOS it wants; letting the tokenizer add one would double it.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def fit_length(
    input_ids: list[int], room: int, policy: Literal["skip", "truncate"]
) -> tuple[list[int] | None, bool]:
    """`(ids, truncated)`; ids is None when the prompt is too long and `policy` is skip.

    Truncation keeps the last `room` tokens: the end holds the question being asked and the
    generation prompt the model continues from.
    """
    if len(input_ids) <= room:
        return input_ids, False
    if policy == "skip":
        return None, False
    return input_ids[-room:], True
