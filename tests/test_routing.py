"""The router hook of the agent loop (dmr.routing): step contexts rebuilt from a run's records."""
from __future__ import annotations

import polars as pl

from dmr import routing


def test_replay_contexts_rebuild_what_the_agent_showed():
    s = pl.DataFrame({"task": ["t"] * 3, "step": [0, 1, 2], "prev_action": ["", "go", "take"],
                      "observation": ["room", "at desk", "got it"], "step_type": ["action"] * 3})
    e = pl.DataFrame({"task": ["t"], "goal": ["get it"]})
    [ctx] = routing.replay_contexts(s, e)
    assert [c.step for c in ctx] == [0, 1, 2]
    assert ctx[2].history == [("go", "at desk"), ("take", "got it")]
    assert ctx[2].observation == "got it" and ctx[0].first == "room" and ctx[1].history == [("go", "at desk")]
