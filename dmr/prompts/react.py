"""ReAct-style append-only prompt: prefix, task, initial observation, then `> action` / observation
lines. The model completes the text after the last `>` with one action line.

The text is split only at pre-token boundaries (`>` | ` action`, `\n` | next line), so a prompt
tokenizes the same whole or in pieces, and one sequence per episode supervises every action.
"""
from __future__ import annotations

from pathlib import Path

from dmr.prompts.base import Episode

PROMPTS = Path(__file__).resolve().parent


def fewshot_prefix(name: str) -> str:
    """A named few-shot prefix: dmr/prompts/{name}_fewshot.txt (e.g. `alfworld`, written from expert
    runs by dmr.envs.alfworld.make_fewshot), or a path to a .txt file."""
    path = Path(name) if name.endswith(".txt") else PROMPTS / f"{name}_fewshot.txt"
    if not path.is_file():
        known = sorted(f.name[:-len("_fewshot.txt")] for f in PROMPTS.glob("*_fewshot.txt"))
        raise ValueError(f"few-shot prefix {name!r}: no file {path}; known names: {known} (or a .txt path)")
    return path.read_text()


class React:
    name = "react"
    stop = ["\n"]

    def __init__(self, prefix: str = "", window: int = 0, fewshot: str | None = None):
        # `window` > 0 keeps only the most recent steps (for long episodes and small contexts).
        # `fewshot` names a stored prefix, so configs need not carry the examples as a string.
        if fewshot and prefix:
            raise ValueError("give the react prompt a `prefix` or a `fewshot` name, not both")
        self.prefix = fewshot_prefix(fewshot) if fewshot else prefix
        self.window = window

    def _head(self, ep: Episode) -> str:
        return f"{self.prefix}{ep.goal.strip()}\n{ep.first.strip()}\n>"

    def render(self, tokenizer, ep: Episode) -> str:
        hist = ep.history[-self.window:] if self.window > 0 else ep.history
        return self._head(ep) + "".join(self.answer(a) + f"{o.strip()}\n>" for a, o in hist)

    def episode(self, text: str) -> Episode:
        """The episode a rendered prompt shows (the inverse of `render` without a window): what a
        proxy that only sees prompts needs to rebuild the trajectory. Needs one-line observations."""
        if self.prefix and text.startswith(self.prefix):
            text = text[len(self.prefix):]
        chunks = text.split("\n>")
        if len(chunks) < 2 or chunks[-1].strip():
            raise ValueError("not a ReAct prompt: it must end with the '>' of the next action")
        goal, _, first = chunks[0].partition("\n")
        history = []
        for c in chunks[1:-1]:
            action, _, obs = c.partition("\n")
            history.append((action.strip(), obs.strip()))
        return Episode(goal.strip(), first.strip(), history)

    def answer(self, action: str) -> str:
        return f" {action}\n"

    def parse(self, text: str) -> str | None:
        line = text.split("\n", 1)[0]
        action = " ".join(line.split())
        return action or None

    def reasoning(self, text: str) -> list[tuple[int, int]]:
        # A ReAct answer is one action line; ALFWorld's thinking is a step of its own (`think: ...`).
        return []

    def segments(self, tokenizer, goal, first, steps):
        """One sequence per episode. A step whose executed action was injected noise is shown as
        executed but not supervised (None); the expert labels of the steps after it teach the recovery."""
        seq = [(self._head(Episode(goal, first)), False)]
        for i, s in enumerate(steps):
            seq.append((self.answer(s["action"]), True if s["action"] == s["label"] else None))
            if i + 1 < len(steps):
                seq.append((f"{s['next_obs'].strip()}\n>", False))
        return [seq]
