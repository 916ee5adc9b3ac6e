"""Instruction-style step prompt (the paper's WebShop protocol, App. B; also used for the tiny agents).

Each step's prompt is rebuilt from: the task, a window of the most recent (action, observation)
pairs, the current observation and the admissible actions. The model answers
`<think>...</think><action>...</action>` where the think block is optional.
"""
from __future__ import annotations

import re

SYSTEM = "You are an agent acting in a text environment. Answer with <action>one admissible action</action>."

_ACTION_RE = re.compile(r"<action>(.*?)</action>", re.DOTALL)


def build_messages(goal: str, history: list[tuple[str, str]], observation: str, admissible: list[str],
                   window: int, system: bool = False) -> list[dict]:
    """Chat messages for one step. `history` is every earlier (action, observation) of the episode."""
    lines = [goal.strip()]
    recent = history[-window:] if window > 0 else []
    for action, obs in recent:
        lines.append(f"> {action}")
        lines.append(obs.strip())
    # The current observation normally closes the history already; state it only when it does not.
    if not recent or recent[-1][1].strip() != observation.strip():
        lines.append(observation.strip())
    lines.append("Admissible actions: " + " | ".join(admissible))
    messages = [{"role": "user", "content": "\n".join(lines)}]
    if system:
        messages.insert(0, {"role": "system", "content": SYSTEM})
    return messages


def format_answer(action: str, think: str | None = None) -> str:
    body = f"<action>{action}</action>"
    return f"<think>{think}</think>{body}" if think else body


def parse_action(text: str) -> str | None:
    """The action inside the last <action> block, or None when the output is malformed.

    The last block wins because a model that rambles often restates its final answer at the end.
    """
    found = _ACTION_RE.findall(text)
    if not found:
        return None
    action = " ".join(found[-1].split())
    return action or None
