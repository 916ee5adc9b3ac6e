"""Progress of a run (dmr.progress): the rollouts in flight and their episodes done of their total."""
from __future__ import annotations

import json

from dmr import progress


def test_in_flight_rollouts_and_their_counts(tmp_path, capsys):
    live = tmp_path / "household/tiny/w2/rollouts/dmr-k0.4/seed0"
    done = tmp_path / "household/tiny/w2/rollouts/random-k0.4/seed0"
    for run, n in ((live, 200), (done, 200)):
        run.mkdir(parents=True)
        (run / "spec.json").write_text(json.dumps({"n": n}))
    (live / "episodes.jsonl").write_text('{"task": "a"}\n{"task": "b"}\n{"task": "c"}\n')
    (done / "episodes.parquet").write_bytes(b"")  # finished: not in flight
    assert progress.in_flight(tmp_path) == [("household/tiny/w2/rollouts/dmr-k0.4/seed0", 3, 200)]
    progress.main(["--results", str(tmp_path), "--once"])
    assert "rollout household/tiny/w2/rollouts/dmr-k0.4/seed0: 3/200 episodes" in capsys.readouterr().err


def test_a_whole_split_run_has_no_total(tmp_path, capsys):
    """A run of every game of a fixed split (`--n all`, ALFWorld's test split) records n as null: shown
    as `all`, and a malformed n is skipped, never a crash that ends the reports."""
    whole, bad = tmp_path / "alfworld/t/bf16/rollouts/full/seed0", tmp_path / "alfworld/t/bf16/rollouts/full/seed1"
    for run, n in ((whole, None), (bad, "many")):
        run.mkdir(parents=True)
        (run / "spec.json").write_text(json.dumps({"n": n}))
    (whole / "episodes.jsonl").write_text('{"task": "a"}\n')
    assert progress.in_flight(tmp_path) == [("alfworld/t/bf16/rollouts/full/seed0", 1, None)]
    progress.main(["--results", str(tmp_path), "--once"])
    assert "rollout alfworld/t/bf16/rollouts/full/seed0: 1/all episodes" in capsys.readouterr().err


def test_stops_with_the_process_it_watches(tmp_path):
    # A pid that cannot exist: the reporter returns at once instead of waiting `every` seconds.
    progress.main(["--results", str(tmp_path), "--every", "3600", "--pid", str(2 ** 22 + 12345)])


def test_a_zombie_counts_as_ended(tmp_path):
    """Snakemake may have exited but not been reaped yet while its caller reads the pipes the
    reporter holds open: the reporter must end then, or caller and reporter wait on each other."""
    import subprocess
    import time

    child = subprocess.Popen(["true"])
    time.sleep(0.3)  # exited; not reaped while nobody waits on it
    assert not progress.alive(child.pid)
    start = time.time()
    progress.main(["--results", str(tmp_path), "--every", "3600", "--pid", str(child.pid)])
    assert time.time() - start < 5
    child.wait()
