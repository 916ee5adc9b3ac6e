"""The grammar of routing-policy names, as the workflow writes them in result paths
(results/.../{quant}/rollouts/{policy}/{run}); this module is the one place that parses and formats them.

A routed name is KIND-MODE VALUE:
  dmr-tT / dmr-kK       the KL-ST router at the fixed threshold T / at the threshold calibrated for budget K
  dmr0-tT / dmr0-kK     the same with the round-0 KL-ST router (route.dagger)
  grpo-tT / grpo-kK     the same with the GRPO-refined router
  dmr-cK                the KL-ST router at the threshold calibrated for a cost budget K (a share of
                        bf16's modelled cost, dmr.calibrate --by-cost): a two-precision router met at
                        the cost of a router over more precisions
  random-kK, oracle-kK, uncertainty-kK
                        baselines matched to the realised high-precision fraction of dmr-kK (budget only)
Other names pass through unparsed: `full`, `quant` and `random:P` are dmr.agent's own policies, and
`forced` is the workflow's name for dmr.agent's `random:0` under the benchmark's router steps: every
step a router would decide at the low precision, every other step (App. C.1's forced steps, WebShop's
searches) at bf16.

A scheme name ({quant} in those paths) is one low precision, or a ladder `A+B`: one router over
bf16, A and B, costliest first (`scheme_lows`, `is_ladder`).
"""
from __future__ import annotations

import re
from typing import NamedTuple

ROUTERS = ("dmr", "dmr0", "grpo")  # learned routers: a threshold (t) or a calibrated budget (k)
BASELINES = ("random", "oracle", "uncertainty")  # matched to dmr-kK: a budget only
MODES = {"k": "budget", "t": "threshold", "c": "cost budget"}
FIXED = ("full", "quant", "forced")
_NAME = re.compile(r"(?P<kind>[a-z0-9]+)-(?P<mode>[a-z])(?P<value>.*)")
_VALUE = re.compile(r"[0-9]+(\.[0-9]*)?|\.[0-9]+")


LADDER = "+"  # joins the low precisions of a ladder scheme


def scheme_lows(quant: str) -> list[str]:
    """The low precisions a scheme name routes, costliest first: `A` is [A], `A+B` is [A, B]."""
    return quant.split(LADDER)


def is_ladder(quant: str) -> bool:
    """Whether a scheme routes more than one low precision (its budgets are cost shares)."""
    return LADDER in quant


class Policy(NamedTuple):
    kind: str  # dmr, dmr0, grpo, random, oracle, uncertainty; or the whole name of an unrouted policy
    mode: str | None = None  # k (budget), t (threshold) or c (cost budget); None for an unrouted policy
    value: str | None = None  # as written in the name, e.g. "0.4"

    @property
    def routed(self) -> bool:
        return self.mode is not None


def format_policy(kind: str, mode: str, value: float | str) -> str:
    """The name of a routed policy: format_policy("dmr", "k", 0.4) == "dmr-k0.4" (numbers as :g)."""
    name = f"{kind}-{mode}{value if isinstance(value, str) else format(value, 'g')}"
    parse_policy(name)
    return name


def parse_policy(name: str) -> Policy:
    """Policy(kind, mode, value) of a routed name; Policy(name) of an unrouted one (full, quant,
    random:P). A malformed routed name raises ValueError naming what is wrong."""
    if name in FIXED or name.startswith("random:"):
        return Policy(name)
    m = _NAME.fullmatch(name)
    if not m:
        raise ValueError(f"policy {name!r}: expected full, quant, random:P or KIND-kK / KIND-tT (e.g. dmr-k0.4)")
    kind, mode, value = m["kind"], m["mode"], m["value"]
    if kind not in ROUTERS + BASELINES:
        raise ValueError(f"policy {name!r}: unknown kind {kind!r}; expected one of {', '.join(ROUTERS + BASELINES)}")
    if mode not in MODES:
        raise ValueError(f"policy {name!r}: unknown mode {mode!r}; expected k (budget), t (threshold) or c (cost budget)")
    if not _VALUE.fullmatch(value):
        raise ValueError(f"policy {name!r}: {MODES[mode]} {value!r} is not a number")
    if mode == "c" and kind != "dmr":
        raise ValueError(f"policy {name!r}: a cost budget calibrates the KL-ST router, write dmr-c{value}")
    if kind in BASELINES and mode != "k":
        raise ValueError(f"policy {name!r}: baselines are matched to a budget, write {kind}-k{value}")
    return Policy(kind, mode, value)
