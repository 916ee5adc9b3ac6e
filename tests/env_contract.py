"""The environment contract (dmr.envs.base) as one check that every adapter's tests run:
household, shop, alfworld and webshop. It exercises only the protocol, never an env's internals,
so an adapter that passes it can be driven by dmr.agent and dmr.expert."""
from __future__ import annotations

import re

import pytest

from dmr.envs.base import SPLITS, Env, Observation, Transition


def admits(action: str, admissible: list[str]) -> bool:
    """`action` is admissible, literally or as an instance of a template such as
    `search[<your query>]` (a `<...>` placeholder stands for any non-empty text)."""
    for a in admissible:
        if a == action:
            return True
        if "<" in a:
            pattern = ".+".join(re.escape(part) for part in re.split(r"<[^>]*>", a))
            if re.fullmatch(pattern, action, re.DOTALL):
                return True
    return False


def _check_transition(tr, env):
    assert isinstance(tr, Transition)
    assert isinstance(tr.text, str) and isinstance(tr.admissible, list)
    assert 0.0 <= tr.score <= 1.0
    assert tr.won == (tr.score >= 1.0 - 1e-9) or not tr.done, "success is score 1"
    assert isinstance(tr.info.get("step_type", "action"), str)
    if "next_step_type" in tr.info:
        assert isinstance(tr.info["next_step_type"], str)


def check_contract(make_env, split: str = "test", n: int = 3, bad_action: str = "xyzzy frobnicate",
                   expert_wins: bool = True):
    """Run the contract on `n` tasks of `split` of the env built by `make_env()`. `expert_wins`: the
    expert must reach success (score 1); otherwise it must finish with a positive score."""
    env = make_env()
    assert isinstance(env, Env)
    assert isinstance(env.name, str) and env.name and env.max_steps >= 1

    # A fresh env has no episode: stepping or asking the expert is an error, not a silent no-op.
    with pytest.raises(RuntimeError):
        env.step("look")
    with pytest.raises(RuntimeError):
        env.expert_action()
    with pytest.raises(ValueError):
        env.tasks("no-such-split", 1)

    tasks = env.tasks(split, n)
    assert [t.index for t in tasks] == list(range(n))
    assert all(t.benchmark == env.name and t.split == split for t in tasks)
    assert len({t.key for t in tasks}) == n
    if n > 1:
        assert [t.key for t in env.tasks(split, n - 1, offset=1)] == [t.key for t in tasks[1:]]
    assert set(SPLITS) == {"train", "calib", "test"}

    for task in tasks:
        first = env.reset(task)
        assert isinstance(first, Observation)
        assert first.text and first.goal and first.admissible
        # The same task rebuilds the same first observation, in another env object too.
        again = make_env().reset(task)
        assert (again.text, again.goal, again.admissible) == (first.text, first.goal, first.admissible)
        env.reset(task)

        # A bad action is answered, counts as a step and is marked invalid.
        tr = env.step(bad_action)
        _check_transition(tr, env)
        assert tr.valid is False and not tr.won

        # The expert's actions are admissible and finish the episode within max_steps.
        env.reset(task)
        admissible, steps = first.admissible, 0
        while True:
            action = env.expert_action()
            assert admits(action, admissible), (task.key, action, admissible)
            tr = env.step(action)
            steps += 1
            _check_transition(tr, env)
            assert tr.valid, (task.key, action)
            admissible = tr.admissible
            if tr.done:
                break
            assert steps < env.max_steps
        if expert_wins:
            assert tr.won and tr.score == 1.0, f"{task.key}: the expert did not win"
        else:
            assert tr.score > 0.0, f"{task.key}: the expert finished with score 0"
        with pytest.raises(RuntimeError):
            env.step(action)
    return env
