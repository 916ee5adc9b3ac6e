"""Prompt protocols: how an episode so far becomes the LLM's input, and how its answer is read.

- `instruct`: the instruction-style step prompt (paper App. B, WebShop): task, a window of recent
  steps, the current observation and the admissible actions, answered `<action>...</action>`
  (optionally after `<think>...</think>`), rebuilt each step and templated as a chat.
- `react`: the ReAct-style append-only prompt (paper App. B, C.2, ALFWorld): an optional fixed
  few-shot prefix, the task, the initial observation and the cumulative trajectory, answered by
  one action line.

A style also says how an episode becomes behaviour-cloning sequences (`segments`), so the tiny
agents train on exactly what they read at run time.
"""
from __future__ import annotations

from dmr.prompts.base import Episode, PromptStyle, constraint  # noqa: F401
from dmr.prompts.instruct import Instruct
from dmr.prompts.react import React

STYLES = {"instruct": Instruct, "react": React}


def get(style: str, **kwargs) -> PromptStyle:
    if style not in STYLES:
        raise ValueError(f"unknown prompt style {style!r}; known: {sorted(STYLES)}")
    return STYLES[style](**kwargs)
