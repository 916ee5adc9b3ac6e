"""Progress of a workflow run, for someone watching `make run`: which rollouts run and how far each
has got (episodes done of its total), every `--every` seconds, until the Snakemake process it
watches ends.

A rollout in flight is a run directory (dmr.rundir) with a spec.json and no episodes.parquet yet;
its total is the spec's `n` (null for every game of a fixed split: shown as `all`) and its progress
the finished episodes in episodes.jsonl. Snakemake's own lines say which rule started and finished;
this adds the inside of the long jobs. Started by the workflow's onstart hook; `--once` prints one
report and exits.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from dmr.rundir import EPISODES


def in_flight(results: Path) -> list[tuple[str, int, int | None]]:
    """(run directory, episodes done, episodes planned or None for a whole split) of every unfinished
    rollout under results."""
    out = []
    for spec in sorted(results.glob("**/spec.json")):
        run = spec.parent
        if (run / "episodes.parquet").exists() or "stale-" in str(run):
            continue
        try:
            n = json.loads(spec.read_text())["n"]
            n = None if n is None else int(n)
        except (OSError, ValueError, TypeError, KeyError):
            continue
        done = sum(1 for _ in (run / EPISODES).open()) if (run / EPISODES).exists() else 0
        out.append((str(run.relative_to(results)), done if n is None else min(done, n), n))
    return out


def report(results: Path) -> str:
    runs = in_flight(results)
    if not runs:
        return ""
    stamp = time.strftime("%H:%M:%S")
    return "\n".join(f"[{stamp}] rollout {name}: {done}/{'all' if n is None else n} episodes" for name, done, n in runs)


def alive(pid: int) -> bool:
    """Whether `pid` still runs: a zombie (exited, not yet reaped) counts as ended."""
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", type=Path, default=Path("results"))
    p.add_argument("--every", type=float, default=60.0, help="seconds between reports")
    p.add_argument("--pid", type=int, default=None, help="stop when this process (Snakemake) ends")
    p.add_argument("--once", action="store_true", help="print one report and exit")
    a = p.parse_args(argv)
    parent = os.getppid()
    while True:
        text = report(a.results)
        if text:
            print(text, file=sys.stderr, flush=True)
        if a.once:
            return
        for _ in range(int(a.every * 10)):
            # Ends with the process it watches, and when its parent goes (it holds the parent's
            # stderr open; a caller reading that pipe to its end must not wait on it).
            if (a.pid is not None and not alive(a.pid)) or os.getppid() != parent:
                return
            time.sleep(0.1)


if __name__ == "__main__":
    main()
