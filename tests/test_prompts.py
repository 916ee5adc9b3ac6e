"""Prompt styles (dmr.prompts): parsing answers, windows, round trips and append-only ReAct prompts."""
from __future__ import annotations

import pytest

from dmr.prompts import Episode, get
from dmr.prompts.instruct import format_answer, parse_action


@pytest.mark.parametrize("text,expected", [
    ("<action>go to cabinet 1</action>", "go to cabinet 1"),
    ("<think>the apple may be in the fridge</think><action>go to fridge 1</action>", "go to fridge 1"),
    ("<action>  take   apple 1 from\ncountertop 2 </action>", "take apple 1 from countertop 2"),
    ("<action>look</action> rambling <action>inventory</action>", "inventory"),
    ("go to cabinet 1", None),                 # no tags
    ("<action>go to cabinet 1", None),         # unterminated
    ("<action></action>", None),               # empty
    ("<action>   </action>", None),
    ("", None),
    ("\x00\xff<action", None),
])
def test_parse_action(text, expected):
    assert parse_action(text) == expected


def test_instruct_prompt_window_and_answer_roundtrip():
    hist = [(f"go to cabinet {i}", f"You arrive at cabinet {i}.") for i in range(1, 6)]
    style = get("instruct", window=2)
    msg = style.content(Episode("Your task is to: x.", "You are in the middle of a room.", hist, ["look", "inventory"]))
    assert "cabinet 3" not in msg and "> go to cabinet 4" in msg and msg.count("You arrive at cabinet 5.") == 1
    assert "middle of a room" not in msg and msg.endswith("Admissible actions: look | inventory")
    assert parse_action(format_answer("look", think="hmm")) == "look"
    assert style.parse(style.answer("go to cabinet 2")) == "go to cabinet 2"
    # the inverse a proxy reads: the window's steps (the initial observation no longer shown), or step 0
    assert style.episode(msg) == Episode("Your task is to: x.", "", hist[-2:], ["look", "inventory"])
    start = Episode("Your task is to: x.", "You are in the middle of a room.", [], ["look"])
    assert style.episode(style.content(start)) == start


@pytest.mark.parametrize("text,expected", [
    (" go to cabinet 1\n", "go to cabinet 1"),
    (" take  apple 1 from countertop 2\nYou pick up", "take apple 1 from countertop 2"),
    ("\n", None),
    ("", None),
])
def test_react_parse(text, expected):
    assert get("react").parse(text) == expected


def test_react_prompt_is_append_only_and_tokenizes_in_pieces(tiny_world):
    from transformers import AutoTokenizer

    eps, tok_dir, _ = tiny_world
    tok = AutoTokenizer.from_pretrained(tok_dir)
    style = get("react")
    from dmr.expert import read_episodes, sequences

    ep = read_episodes(eps)[0]
    (seq,) = sequences(ep, style, tok)
    whole = "".join(t for t, _ in seq)
    # pieces and whole text tokenize identically, so training matches run-time prompts
    assert tok.encode(whole, add_special_tokens=False) == [i for t, _ in seq for i in tok.encode(t, add_special_tokens=False)]
    # every run-time prompt is a prefix of the episode sequence (append-only)
    e = Episode(ep["goal"], ep["first"])
    for s in ep["steps"]:
        assert whole.startswith(style.render(tok, e))
        e.history.append((s["action"], s["next_obs"]))
