"""Instruction-style step prompt, rebuilt every step and templated as a chat."""
from __future__ import annotations

import re

from dmr.prompts.base import Episode

_ACTION_RE = re.compile(r"<action>(.*?)</action>", re.DOTALL)
# A reasoning block; an unclosed one (the step ran out of tokens while thinking) runs to the end.
_THINK_RE = re.compile(r"<think>.*?(?:</think>|\Z)", re.DOTALL)
ADMISSIBLE = "Admissible actions:"  # the prompt's last line starts with it


def parse_action(text: str) -> str | None:
    """The action inside the last <action> block, or None when the output is malformed.

    The last block wins because a model that rambles often restates its final answer at the end.
    """
    found = _ACTION_RE.findall(text)
    if not found:
        return None
    action = " ".join(found[-1].split())
    return action or None


def reasoning_spans(text: str) -> list[tuple[int, int]]:
    """Character spans of the `<think>...</think>` blocks of a completion, tags included: what the
    action-block KL (dmr.kl) leaves out. An unclosed block runs to the end of the text."""
    return [m.span() for m in _THINK_RE.finditer(text)]


def format_answer(action: str, think: str | None = None) -> str:
    body = f"<action>{action}</action>"
    return f"<think>{think}</think>{body}" if think else body


class Instruct:
    name = "instruct"
    stop = None  # the chat turn ends with the tokenizer's EOS

    def __init__(self, window: int = 4):
        self.window = window

    def content(self, ep: Episode) -> str:
        lines = [ep.goal.strip()]
        recent = ep.history[-self.window:] if self.window > 0 else []
        for action, obs in recent:
            lines.append(f"> {action}")
            lines.append(obs.strip())
        if not recent:
            lines.append(ep.first.strip())
        lines.append(f"{ADMISSIBLE} " + " | ".join(ep.admissible))
        return "\n".join(lines)

    def episode(self, content: str) -> Episode:
        """The episode a step's `content` shows, as far as its window reaches: the goal, the
        admissible actions and either the initial observation (no step taken yet) or the last
        `window` (action, observation) pairs, `first` then '' as the prompt no longer shows it. What a
        proxy that only sees prompts reads (dmr.serve keeps the rest of the trajectory). Needs a
        one-line goal and observations without a line that starts with '> '."""
        lines = content.strip().split("\n")
        if len(lines) < 3 or not lines[-1].startswith(ADMISSIBLE):
            raise ValueError("not an instruct prompt: it must be the task line, then the initial observation or the "
                             f"recent '> action' / observation lines, then a last line '{ADMISSIBLE} a | b | ...'")
        admissible = [a.strip() for a in lines[-1][len(ADMISSIBLE):].split(" | ") if a.strip()]
        goal, body = lines[0].strip(), lines[1:-1]
        if not body[0].startswith("> "):
            return Episode(goal, "\n".join(body).strip(), [], admissible)
        history = []
        for line in body:
            if line.startswith("> "):
                history.append([line[2:].strip(), []])
            else:
                history[-1][1].append(line)
        return Episode(goal, "", [(a, "\n".join(obs).strip()) for a, obs in history], admissible)

    def render(self, tokenizer, ep: Episode) -> str:
        return tokenizer.apply_chat_template([{"role": "user", "content": self.content(ep)}],
                                             tokenize=False, add_generation_prompt=True)

    def answer(self, action: str) -> str:
        return format_answer(action)

    def parse(self, text: str) -> str | None:
        return parse_action(text)

    def reasoning(self, text: str) -> list[tuple[int, int]]:
        return reasoning_spans(text)

    def segments(self, tokenizer, goal, first, steps):
        ep, out = Episode(goal, first), []
        for s in steps:
            ep.admissible = s["admissible"]
            out.append([(self.render(tokenizer, ep), False), (self.answer(s["label"]) + tokenizer.eos_token, True)])
            ep.history.append((s["action"], s["next_obs"]))
        return out
