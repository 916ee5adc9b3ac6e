"""Environment registry. A new benchmark is one new module here plus one line in ENVS."""
from __future__ import annotations

import importlib

from dmr.envs.base import SPLITS, Env, ExpertFailed, Observation, Task, Transition, split_seed  # noqa: F401

ENVS = {
    "household": "dmr.envs.household:HouseholdEnv",
    "alfworld": "dmr.envs.alfworld:AlfWorldEnv",
    "shop": "dmr.envs.shop:ShopEnv",
    "webshop": "dmr.envs.webshop:WebShopEnv",
}


def make(name: str, **kwargs) -> Env:
    if name not in ENVS:
        raise ValueError(f"unknown environment {name!r}; known: {sorted(ENVS)}")
    module, cls = ENVS[name].split(":")
    return getattr(importlib.import_module(module), cls)(**kwargs)
