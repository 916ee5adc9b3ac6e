"""Benchmark data: make sure a benchmark's files are there before any job plays a game.

Environments whose games come from a download (ALFWorld) define
`ensure_data(data, splits, fetch, keys)` in their module: it builds the data root the jobs read
with every split that the protocol splits asked for (`--need`) map to, from the sources it knows
(ALFWorld: the root itself, $ALFWORLD_DATA, the shared copy, unpacking its archive), fetches what
no source has where the internet is reachable (`alfworld-download`), and otherwise fails saying
how to provide it. Then every protocol split asked for is counted against the tasks it needs, and
data.json records what the results will be computed on: the data root, each protocol split's
resolved mapping (`maps_to`: e.g. ALFWorld's test split is valid_unseen where the data has it),
its games, where each split folder comes from, and the environment's package versions (ALFWorld
0.3 and 0.4 games differ in their action grammar, so numbers are only comparable within one
version).
"""
from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path

from dmr import envs


def check(env_name: str, env_kwargs: dict, need: dict[str, int | None], fetch: bool = True) -> dict:
    """The manifest of a benchmark's data; raises SystemExit when the data cannot serve `need`
    (protocol split -> tasks, None = every game of the split, at least one)."""
    module = importlib.import_module(envs.ENVS[env_name].split(":")[0]) if env_name in envs.ENVS else None
    if module is None:
        raise SystemExit(f"unknown environment {env_name!r}; known: {sorted(envs.ENVS)}")
    root = None
    if hasattr(module, "ensure_data"):
        root = module.ensure_data(env_kwargs.get("data"), env_kwargs.get("splits"), fetch=fetch,
                                  keys=list(need) or None)
    env = envs.make(env_name, **env_kwargs)
    resolved = getattr(env, "resolved_splits", {})
    splits = {}
    for split, n in need.items():
        size = env.split_size(split) if hasattr(env, "split_size") else None
        maps_to = resolved.get(split)
        if size is not None and (n or 1) > size:
            raise SystemExit(f"{env_name}: the config asks for {'all' if n is None else n} {split} tasks but "
                             f"split {split!r} ({maps_to or split}) has {size} games")
        splits[split] = {"tasks": size if n is None else n, "games": size, "maps_to": maps_to}
    if hasattr(env, "close"):
        env.close()
    manifest = {"env": env_name, "root": None if root is None else str(root), "splits": splits,
                "versions": getattr(env, "versions", {})}
    if root is not None and hasattr(module, "split_origins"):
        manifest["origins"] = module.split_origins(root)
    return manifest


def parse_need(items) -> dict[str, int | None]:
    """['train=200', 'test=all'] -> {'train': 200, 'test': None}."""
    need = {}
    for item in items:
        split, sep, n = item.partition("=")
        if not sep or not (n.isdigit() or n == "all"):
            raise SystemExit(f"--need expects SPLIT=N or SPLIT=all, got {item!r}")
        need[split] = None if n == "all" else int(n)
    return need


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--env", required=True, help="environment name, e.g. alfworld")
    p.add_argument("--env-kwargs", default="{}", help="JSON keyword arguments of the environment")
    p.add_argument("--need", nargs="*", default=[], metavar="SPLIT=N",
                   help="tasks the workflow uses per protocol split, e.g. train=200 calib=70 test=all "
                        "(all: every game of the split); only these splits are checked (none given: the "
                        "whole mapping)")
    p.add_argument("--no-fetch", action="store_true", help="only check; never download")
    p.add_argument("--out", required=True, type=Path, help="data.json (the manifest)")
    a = p.parse_args(argv)
    manifest = check(a.env, json.loads(a.env_kwargs), parse_need(a.need), fetch=not a.no_fetch)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(manifest, indent=1))
    print(json.dumps(manifest, indent=1))


if __name__ == "__main__":
    main()
