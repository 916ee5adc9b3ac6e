"""The command-line flags that several entry points share (dmr.agent, dmr.grpo, dmr.serve, dmr.kl):
argparse parents, each a fresh parser (`parents=[...]`), so that a flag means the same thing,
with the same default, wherever it is given. An entry point whose default differs says so with
its own `parser.set_defaults`."""
from __future__ import annotations

import argparse
import json


def _parent() -> argparse.ArgumentParser:
    return argparse.ArgumentParser(add_help=False)


def env() -> argparse.ArgumentParser:
    """--env, --env-kwargs: the environment (dmr.envs.make)."""
    p = _parent()
    p.add_argument("--env", required=True)
    p.add_argument("--env-kwargs", default="{}", help="JSON keyword arguments of the environment")
    return p


def backend(choose: bool = True) -> argparse.ArgumentParser:
    """--backend (unless not `choose`: a proxy picks its own), --backend-kwargs: dmr.llm.load."""
    p = _parent()
    if choose:
        p.add_argument("--backend", default="hf")
    p.add_argument("--backend-kwargs", default="{}", help="JSON keyword arguments of the backend")
    return p


def decoding(defaults) -> argparse.ArgumentParser:
    """The agent's prompt and decoding flags; their defaults are the fields of `defaults` (a
    dmr.agent.AgentConfig)."""
    p = _parent()
    p.add_argument("--prompt", type=json.loads, default=defaults.prompt,
                   help='JSON prompt spec, e.g. \'{"style": "instruct", "window": 4}\'')
    p.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens)
    p.add_argument("--temperature", type=float, default=defaults.temperature, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=defaults.top_p)
    p.add_argument("--constrained", action="store_true", help="decode only admissible actions")
    p.add_argument("--shards", type=int, default=defaults.shards, help="concurrent episodes")
    p.add_argument("--seed", type=int, default=defaults.seed)
    return p


def pacing() -> argparse.ArgumentParser:
    """--pace, --burst: per-episode pacing of a learned router (dmr.router.Router.set_pace)."""
    p = _parent()
    p.add_argument("--pace", type=float, default=None,
                   help="per-episode budget: a step goes high only while the episode's high steps stay within PACE x "
                        "its routed steps so far + --burst, and the threshold is capped at the router's decision "
                        "boundary 0.5 (dmr.router.Router.set_pace; the workflow's route.pace: --pace K with --budget K)")
    p.add_argument("--burst", type=float, default=0.0, help="with --pace: high steps an episode may take ahead of the pace")
    return p


def kl_block() -> argparse.ArgumentParser:
    """--kl-block: which part of a step's output the step KL scores (dmr.kl; the KL oracle and the
    online probe of dmr.agent measure it the same way, so their KL compares with the pool's)."""
    p = _parent()
    p.add_argument("--kl-block", choices=("action", "output"), default="action",
                   help="action: the action block, the output without its <think> reasoning (App. C.1); "
                        "output: the whole output. They differ only where an output has reasoning")
    return p
