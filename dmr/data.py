"""Benchmark data: make sure a benchmark's files are there before any job plays a game.

Environments whose games come from a download (ALFWorld) define `ensure_data(data, splits, fetch)`
in their module: data already present is only checked; missing data is fetched where the internet
is reachable (ALFWorld: `alfworld-download`), and otherwise the job fails saying how to provide
it. Then every protocol split the workflow uses is counted against the tasks it asks for, and
data.json records what the results will be computed on: the data root, the games per split and
the environment's package versions (ALFWorld 0.3 and 0.4 games differ in their action grammar,
so numbers are only comparable within one version).
"""
from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path

from dmr import envs


def check(env_name: str, env_kwargs: dict, need: dict[str, int], fetch: bool = True) -> dict:
    """The manifest of a benchmark's data; raises SystemExit when the data cannot serve `need`."""
    module = importlib.import_module(envs.ENVS[env_name].split(":")[0]) if env_name in envs.ENVS else None
    if module is None:
        raise SystemExit(f"unknown environment {env_name!r}; known: {sorted(envs.ENVS)}")
    root = None
    if hasattr(module, "ensure_data"):
        root = module.ensure_data(env_kwargs.get("data"), env_kwargs.get("splits"), fetch=fetch)
    env = envs.make(env_name, **env_kwargs)
    splits = {}
    for split, n in need.items():
        size = env.split_size(split) if hasattr(env, "split_size") else None
        if size is not None and n > size:
            raise SystemExit(f"{env_name}: the config asks for {n} {split} tasks but split {split!r} "
                             f"({getattr(env, 'splits', {}).get(split, split)}) has {size} games")
        splits[split] = {"tasks": n, "games": size, "maps_to": getattr(env, "splits", {}).get(split)}
    if hasattr(env, "close"):
        env.close()
    return {"env": env_name, "root": None if root is None else str(root), "splits": splits,
            "versions": getattr(env, "versions", {})}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--env", required=True, help="environment name, e.g. alfworld")
    p.add_argument("--env-kwargs", default="{}", help="JSON keyword arguments of the environment")
    p.add_argument("--need", nargs="*", default=[], metavar="SPLIT=N",
                   help="tasks the workflow uses per protocol split, e.g. train=200 calib=70 test=70")
    p.add_argument("--no-fetch", action="store_true", help="only check; never download")
    p.add_argument("--out", required=True, type=Path, help="data.json (the manifest)")
    a = p.parse_args(argv)
    need = {}
    for item in a.need:
        split, sep, n = item.partition("=")
        if not sep or not n.isdigit():
            raise SystemExit(f"--need expects SPLIT=N, got {item!r}")
        need[split] = int(n)
    manifest = check(a.env, json.loads(a.env_kwargs), need, fetch=not a.no_fetch)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(manifest, indent=1))
    print(json.dumps(manifest, indent=1))


if __name__ == "__main__":
    main()
