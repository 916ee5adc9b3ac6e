"""Constrained decoding's prefix tree: the token ids a row may emit next, given what it emitted so
far, so that it can only complete one of the allowed continuations (HF and vLLM backends)."""
from __future__ import annotations


class Trie:
    """Token-id prefix tree of the allowed completions of one prompt."""

    def __init__(self, sequences: list[list[int]]):
        self.root: dict = {}
        for seq in sequences:
            node = self.root
            for t in seq:
                node = node.setdefault(t, {})

    def next_tokens(self, prefix: list[int]) -> list[int]:
        node = self.root
        for t in prefix:
            node = node.get(t)
            if node is None:
                return []
        return list(node)
