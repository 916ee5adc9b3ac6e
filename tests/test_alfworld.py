"""The ALFWorld adapter on the real game files (alfworld 0.4, TextWorld engine): splits and tasks,
reset/step semantics, think steps, the experts (clean and DAgger-noisy), the few-shot prefix and the
agent loop on real games. Nothing is mocked; everything skips when the game files are absent.

Every game of valid_seen (140) and valid_train (200) is won by both experts, but the full sweep
took 28 min on a shared 2-core machine (planner/walkthrough 1.4-1.7 s a game, 9 min; handcoded
2.6-4.7 s a game, 20 min), so it is marked `sweep` (opt-in); by default each expert plays one game of each
task type per split (24 games, ~80 s). Rerun 2026-11-28 with the machine loaded ~8: planner (the walkthrough)
valid_seen 29 min and valid_train 18.5 min, handcoded valid_seen under 29 min and valid_train 8.5 min:
all four pass.

The micro real-ALFWorld cell (config/alfworld-micro.yaml) runs end to end under `make test-long` (-m long:
3-4 min on an idle machine, beyond CI's budget beside the rest; loading a real game costs ~1.2 s)."""
from __future__ import annotations

import importlib.metadata
import json
import os
import random
from collections import Counter
from pathlib import Path

import pytest

from dmr import envs


SHARED = Path(__file__).resolve().parents[2] / "shared/data/alfworld"


def _find_data() -> Path | None:
    """A root with valid_seen and valid_train (both the shared copy and `alfworld-download` have
    them): $ALFWORLD_DATA where it has both, else the shared copy."""
    for c in (os.environ.get("ALFWORLD_DATA"), SHARED):
        if c and all((Path(c) / "json_2.1.1" / s).is_dir() for s in ("valid_seen", "valid_train")):
            return Path(c)
    return None


DATA = _find_data()
pytestmark = pytest.mark.skipif(
    DATA is None, reason="ALFWorld game files not found: set ALFWORLD_DATA or provide ../shared/data/alfworld "
                         "(json_2.1.1/valid_seen and valid_train; `alfworld-download` fetches them)")
# Most tests map the protocol splits onto the two small splits every layout has.
SPLITS = {"train": "valid_train", "calib": "valid_seen[::2]", "test": "valid_seen[1::2]"}
# config/alfworld.yaml's mapping: the paper's protocol where the data has valid_unseen.
PAPER_SPLITS = {"train": "train", "calib": "valid_seen[::2]", "test": ["valid_unseen", "valid_seen[1::2]"]}
N_GAMES = {"valid_seen": 140, "valid_train": 200}


def _layout(root: Path, **splits) -> Path:
    """A data root of our own: json_2.1.1/<split> linked to a folder, or made of links to the first
    n game folders (trials) of one, e.g. _layout(tmp, valid_seen=DATA_VS, valid_unseen=(DATA_VS, 134))."""
    games = root / "json_2.1.1"
    games.mkdir(parents=True, exist_ok=True)
    for split, src in splits.items():
        if isinstance(src, tuple):
            src, n = src
            for trial in sorted(Path(src).glob("*/*/game.tw-pddl"))[:n]:
                dest = games / split / trial.parent.parent.name / trial.parent.name
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.symlink_to(trial.parent.resolve(), target_is_directory=True)
        else:
            (games / split).symlink_to(Path(src).resolve(), target_is_directory=True)
    return root


def make(**kw):
    from dmr.envs.alfworld import AlfWorldEnv

    return AlfWorldEnv(**{"data": str(DATA), "splits": SPLITS, **kw})


@pytest.fixture(scope="module")
def env():
    e = make()
    yield e
    e.close()


# ---------------------------------------------------------------------- data, splits, tasks
def test_contract():
    from tests.env_contract import check_contract

    check_contract(make, split="calib", n=1)


def test_missing_data_says_how_to_get_it(monkeypatch, tmp_path):
    from dmr.envs.alfworld import AlfWorldEnv

    monkeypatch.delenv("ALFWORLD_DATA", raising=False)
    with pytest.raises(FileNotFoundError, match="alfworld-download.*ALFWORLD_DATA"):
        AlfWorldEnv()
    with pytest.raises(FileNotFoundError, match="does not exist.*alfworld-download"):
        AlfWorldEnv(data=str(tmp_path / "nowhere"))
    # A root of our own without valid_unseen, reached through a symlink as ../shared may be.
    (tmp_path / "link").symlink_to(_layout(tmp_path / "data", valid_seen=DATA / "json_2.1.1/valid_seen"))
    monkeypatch.setenv("ALFWORLD_DATA", str(tmp_path / "link"))
    e = AlfWorldEnv()  # the default mapping: test -> valid_unseen, which this root lacks
    assert e.root == (tmp_path / "data/json_2.1.1").resolve()
    with pytest.raises(FileNotFoundError, match="valid_unseen.*alfworld-download"):
        e.tasks("test", 1)
    assert len(e.tasks("calib")) == 140  # calib -> valid_seen
    # Alternatives: the first split the root has; resolved_splits says which.
    alt = AlfWorldEnv(splits={"test": ["valid_unseen", "valid_seen[1::2]"]})
    assert alt.resolved_splits == {"test": "valid_seen[1::2]"} and len(alt.tasks("test")) == 70
    _layout(tmp_path / "data", valid_unseen=(DATA / "json_2.1.1/valid_seen", 5))
    assert alt.resolved_splits == {"test": "valid_unseen"} and len(alt.tasks("test")) == 5
    with pytest.raises(ValueError, match="unknown ALFWorld split"):
        AlfWorldEnv(splits={"test": ["valid_unseen", "seen"]})


def test_tasks_splits_and_bounds(env):
    from dmr.envs.alfworld import TASK_TYPES

    assert {s: len(env.tasks(s)) for s in N_GAMES} == N_GAMES
    assert len(env.tasks("train")) == 200 and len(env.tasks("calib")) == 70 and len(env.tasks("test")) == 70
    calib, test = set(env.games("calib")), set(env.games("test"))
    assert not calib & test and calib | test == set(env.games("valid_seen"))
    ts = env.tasks("test", 5, offset=3)
    assert [t.index for t in ts] == [3, 4, 5, 6, 7] and all(t.benchmark == "alfworld" and t.split == "test" for t in ts)
    assert ts[0].key == "alfworld/test/3"
    # task types: the six household names, with the per-folder counts of the split
    folders = Counter(p.name.split("-")[0] for p in (DATA / "json_2.1.1/valid_seen").iterdir()
                      for _ in p.glob("*/game.tw-pddl"))
    assert Counter(t.task_type for t in env.tasks("valid_seen")) == Counter(
        {TASK_TYPES[k]: v for k, v in folders.items()})
    # a fixed order, independent of the object; a prefix mixes the task types
    assert make().games("test") == env.games("test")
    assert len({t.task_type for t in env.tasks("valid_seen", 12)}) >= 4
    assert make(order="path").games("valid_seen") == sorted(env.games("valid_seen"))
    with pytest.raises(ValueError, match="has 70 games"):
        env.tasks("test", 70, offset=1)
    with pytest.raises(ValueError, match="has 140 games"):
        env.tasks("valid_seen", 141)
    with pytest.raises(ValueError, match="unknown split"):
        env.tasks("dev", 1)
    with pytest.raises(ValueError, match="share games"):
        make(splits={"calib": "valid_seen[:80]", "test": "valid_seen[70:]"})
    with pytest.raises(ValueError, match="unknown ALFWorld split"):
        make(splits={"test": "valid_seen[3]"})
    only = make(task_types=["look_at_obj_in_light"])
    assert {t.task_type for t in only.tasks("valid_seen")} == {"look_at_obj_in_light"}
    assert len(only.tasks("valid_seen")) == 13
    with pytest.raises(ValueError, match="task_types"):
        make(task_types=["juggle"])


# ---------------------------------------------------------------------- reset / step
def test_reset_and_step_basics(env):
    task = env.tasks("valid_seen", 1)[0]
    obs = env.reset(task)
    assert obs.goal.startswith("Your task is to: ") and "\n" not in obs.goal
    assert obs.text.startswith("You are in the middle of a room. Looking quickly around you, you see ")
    assert "Your task is to" not in obs.text and "Welcome" not in obs.text
    assert obs.info["alfworld_version"] == importlib.metadata.version("alfworld") == env.alfworld_version
    assert env.alfworld_version.startswith("0.4.")
    assert obs.info["game"] == env.games("valid_seen")[0] and obs.info["task_type"] == task.task_type
    assert {"look", "inventory", "help"} <= set(obs.admissible)
    goes = [a for a in obs.admissible if a.startswith("go to ")]
    assert goes and all(a[len("go to "):] in obs.text for a in goes)
    # the same game again, after another one, and from a fresh env: the same episode
    env.reset(env.tasks("valid_seen", 1, 1)[0])
    again = env.reset(task)
    with make() as fresh:
        other = fresh.reset(task)
    assert (again.text, again.goal, again.admissible) == (obs.text, obs.goal, obs.admissible) == \
        (other.text, other.goal, other.admissible)

    look = env.step("look")
    assert look.valid and look.info["step_type"] == "action" and not look.done and look.score == 0.0
    bad = env.step("fly to the moon")
    assert not bad.valid and bad.text == "Nothing happens." and bad.admissible == look.admissible
    assert bad.info["step_type"] == "action"
    think = env.step("think: the alarmclock may be on the desk.")
    assert think.valid and think.text == "OK." and think.info["step_type"] == "think"
    assert think.admissible == look.admissible and not think.done
    assert env.step("look").text == look.text  # thinking changed nothing
    go = env.step(goes[0])
    assert go.valid and go.text.startswith(f"You arrive at {goes[0][len('go to '):]}.")
    assert go.admissible != look.admissible and go.info["steps"] == 5


def test_max_steps_ends_the_episode():
    e = make(max_steps=3)
    obs = e.reset(e.tasks("valid_train", 1)[0])
    trs = [e.step(a) for a in ("look", "think: hmm", "inventory")]
    assert [t.done for t in trs] == [False, False, True]
    assert not trs[-1].won and trs[-1].score == 0.0
    with pytest.raises(RuntimeError, match="ended"):
        e.step("look")
    assert e.reset(e.tasks("valid_train", 1)[0]).text == obs.text  # and a new episode starts
    e.close()


# ---------------------------------------------------------------------- experts
def _drive(env, task, noise=0.0, rng=None):
    """Play `task` with the env's expert, injecting random admissible actions at rate `noise`."""
    obs = env.reset(task)
    admissible, labels = obs.admissible, []
    while True:
        label = env.expert_action()
        assert label in admissible, (task.key, label)
        labels.append(label)
        action = rng.choice(admissible) if noise and rng.random() < noise else label
        tr = env.step(action)
        admissible = tr.admissible
        if tr.done:
            return tr.won, labels


def _sweep(expert, split, per_type=None, data=None):
    """The expert on every game of `split`, or on a seeded pick of `per_type` games of each task type,
    with the default replan limit (CPU time: a busy machine does not change the outcome)."""
    e = make(expert=expert, **({"data": str(data)} if data else {}))
    tasks = e.tasks(split)
    if per_type:
        rng, by_type = random.Random(f"{expert}/{split}"), {}
        for t in tasks:
            by_type.setdefault(t.task_type, []).append(t)
        assert len(by_type) == 6, sorted(by_type)
        tasks = [t for group in by_type.values() for t in rng.sample(group, per_type)]
    lost = [(t.key, t.task_type) for t in tasks if not _drive(e, t)[0]]
    e.close()
    assert not lost, f"{expert} expert lost {lost}"



def test_translations_persist_on_disk_and_change_nothing(tmp_path, monkeypatch):
    """The on-disk translation cache (sas_cache_dir): the first load of a game writes its translations,
    a process that starts empty reads them back, and either way the episode is the one TextWorld gives
    uncached (memo=False); an unwritable cache only warns."""
    from dmr.envs import alfworld

    task = make().tasks("valid_seen", 1, 2)[0]

    def episode(**kw):
        alfworld._SAS_CACHE.clear()  # a process of its own: nothing in memory
        with make(**kw) as e:
            obs = e.reset(task)
            moves = [e.step(a) for a in obs.admissible[:3]]
        return (obs.text, obs.goal, obs.admissible, [(m.text, m.admissible, m.done) for m in moves])

    monkeypatch.setenv("DMR_SAS_CACHE", str(tmp_path / "sas"))
    assert alfworld.sas_cache_dir() == tmp_path / "sas"
    first = episode()
    written = sorted((tmp_path / "sas").glob("*/*.pkl"))
    assert written and not list((tmp_path / "sas").glob("*/*.tmp"))
    stamps = [f.stat().st_mtime_ns for f in written]
    assert episode() == first and [f.stat().st_mtime_ns for f in written] == stamps  # read, not rewritten
    assert episode(memo=False) == first
    monkeypatch.setenv("DMR_SAS_CACHE", "0")
    assert alfworld.sas_cache_dir() is None and episode() == first
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("DMR_SAS_CACHE", str(blocker / "sas"))
    with pytest.warns(RuntimeWarning, match="not writable"):
        assert episode() == first

# The planner expert without noise plays exactly the game's walkthrough.
@pytest.mark.parametrize("expert", ["planner", "handcoded"])
@pytest.mark.parametrize("split", ["valid_seen", "valid_train"])
def test_expert_wins_sample(expert, split):
    _sweep(expert, split, per_type=1)


def pytest_generate_tests(metafunc):
    """The sweeps run on the splits of `--alfworld-splits` (tests/conftest.py)."""
    if "sweep_split" in metafunc.fixturenames:
        metafunc.parametrize("sweep_split", [s for s in metafunc.config.getoption("alfworld_splits").split(",") if s])


@pytest.fixture(scope="session")
def split_root(tmp_path_factory):
    """A root that has a split: DATA, $ALFWORLD_DATA or the shared copy where one has its folder, else
    one built by ensure_data (train unpacked from the shared archive); skips when none has it."""
    from dmr.envs import alfworld

    def root(split):
        for c in (DATA, os.environ.get("ALFWORLD_DATA"), SHARED):
            if c and (Path(c) / "json_2.1.1" / split).is_dir():
                return Path(c)
        built = tmp_path_factory.getbasetemp() / "alfworld-splits"
        try:
            return alfworld.ensure_data(str(built), {split: split}, fetch=False)
        except SystemExit as e:
            pytest.skip(f"no ALFWorld {split} here: {e}")
    return root


@pytest.mark.sweep
@pytest.mark.parametrize("expert", ["planner", "handcoded"])
def test_expert_wins_every_game(expert, sweep_split, split_root):
    _sweep(expert, sweep_split, data=split_root(sweep_split))


def test_walkthrough_is_the_clean_planner_episode():
    e = make(expert="planner")
    task = e.tasks("valid_seen", 1, 2)[0]
    e.reset(task)
    walkthrough = list(e._plan)
    won, labels = _drive(e, task)
    assert won and labels == walkthrough and e.expert_source == "walkthrough"
    e.close()


@pytest.mark.parametrize("expert", ["planner", "handcoded"])
def test_expert_relabels_noisy_episodes(expert):
    """DAgger-style: random detours, and every label is admissible from the state reached; the
    labels are reproducible."""
    from dmr.expert import episode

    e = make(expert=expert)
    task = e.tasks("valid_train", 1, 4)[0]
    clean = episode(e, task, 0.0, random.Random(0))
    assert clean["won"] and all(s["action"] == s["label"] for s in clean["steps"])
    assert clean["task"] == task.key and clean["goal"].startswith("Your task is to: ")
    noisy = episode(e, task, 0.4, random.Random(1))
    assert noisy["won"] and any(s["action"] != s["label"] for s in noisy["steps"])
    assert all(s["label"] in s["admissible"] for s in noisy["steps"])
    assert episode(e, task, 0.4, random.Random(1)) == noisy
    e.close()


def test_child_limit_is_cpu_time_not_wall_time():
    """`in_child` kills a child for the CPU time it used, not the time it waited: a child that
    sleeps past its limit returns its result, one that computes past it is killed (None), and one
    that dies another way raises."""
    import time

    from dmr.envs.alfworld import in_child

    def busy():
        while True:
            pass

    start = time.perf_counter()
    assert in_child(lambda: time.sleep(0.6) or [1, "a"], cpu_seconds=0.2) == [1, "a"]
    assert time.perf_counter() - start >= 0.6
    assert in_child(busy, cpu_seconds=0.2) is None
    with pytest.raises(ChildProcessError, match="died without a result"):
        in_child(lambda: os._exit(3), cpu_seconds=5)


def test_replan_runs_in_a_child_that_a_time_limit_kills():
    """A replan in a forked child gives the in-process plan; past `replan_timeout` the child is
    killed and the expert says it failed (expert data then skips the episode)."""
    from dmr.envs import ExpertFailed

    e = make(expert="planner")
    e.reset(e.tasks("valid_seen", 1, 2)[0])
    e.step(e.expert_action())  # off the start, so the plan is not the walkthrough's trivially
    e.replan_timeout = 0
    inline = e._replan()
    e.replan_timeout = 60
    assert inline and e._replan() == inline
    e.replan_timeout = 1e-9
    with pytest.raises(ExpertFailed, match="no plan within replan_timeout"):
        e._replan()
    e.replan_timeout = 60
    assert e._replan() == inline  # the killed child left this process's planner as it was
    e.close()


def test_expert_survives_think_and_invalid_steps(env):
    e = make(expert="handcoded")
    task = e.tasks("valid_seen", 1, 5)[0]
    e.reset(task)
    first = e.expert_action()
    assert e.step("think: where could it be?").text == "OK." and e.expert_action() == first
    assert not e.step("take the moon").valid and e.expert_action() == first
    won, _ = _drive(e, task)
    assert won
    e.close()


# ---------------------------------------------------------------------- few-shot prefix and agent loop
def test_fewshot_prefix_is_real_and_compact():
    from dmr.envs.alfworld import FEWSHOT_PATH, fewshot, make_fewshot
    from dmr.prompts import Episode, get

    text = fewshot()
    assert len(text) < 2500 and text == FEWSHOT_PATH.read_text()
    assert text.count("Your task is to: ") == 2 and text.count("> think: ") == 2
    assert "> think: To solve the task" in text and "\nOK.\n> go to " in text
    assert text == make_fewshot(str(DATA)), "alfworld_fewshot.txt no longer matches the expert runs"
    style = get("react", prefix=text)
    prompt = style.render(None, Episode("Your task is to: put a mug in cabinet.", "You are in the middle of a room."))
    assert prompt.startswith(text) and prompt.endswith("Here is the task.\nYour task is to: put a mug in cabinet.\n"
                                                      "You are in the middle of a room.\n>")


def test_agent_loop_runs_real_games(tiny_world, tmp_path):
    from dmr.agent import AgentConfig, run
    from dmr.envs.alfworld import fewshot
    from dmr.llm import load
    from dmr.policies import make_router

    _, _, model = tiny_world
    backend = load("hf", str(model), threads=1)
    kw = {"data": str(DATA), "splits": SPLITS, "max_steps": 3}
    tasks = envs.make("alfworld", **kw).tasks("test", 2)
    cfg = AgentConfig(prompt={"style": "react", "prefix": fewshot()}, max_new_tokens=12, shards=2)
    rows = run(lambda: envs.make("alfworld", **kw), tasks, {"bf16": backend}, make_router("full", ["bf16"]),
               cfg, tmp_path, progress=False)
    assert sorted(r["task"] for r in rows) == sorted(t.key for t in tasks)
    steps = [json.loads(x) for x in (tmp_path / "steps.jsonl").read_text().splitlines()]
    for r in rows:
        mine = sorted((s for s in steps if s["task"] == r["task"]), key=lambda s: s["step"])
        assert [s["step"] for s in mine] == list(range(r["steps"])) and 1 <= r["steps"] <= 3
        assert r["steps"] == 3 or r["won"]
        assert mine[0]["observation"].startswith("You are in the middle of a room.")
        assert r["goal"].startswith("Your task is to: ")
        for s in mine:
            assert s["step_type"] in ("action", "think") and s["precision"] == "bf16"
            if s["step_type"] == "action":
                assert s["valid"] == (s["action"] in s["admissible"])


# ---------------------------------------------------------------------- data rule, thinking expert, labels
def test_data_check_records_versions_and_counts(tmp_path):
    from dmr import data

    kw = {"data": str(DATA), "splits": SPLITS}
    out = tmp_path / "data.json"
    data.main(["--env", "alfworld", "--env-kwargs", json.dumps(kw), "--need", "train=10", "calib=70", "test=3",
               "--out", str(out)])
    m = json.loads(out.read_text())
    assert m["versions"] == {"alfworld": importlib.metadata.version("alfworld"),
                             "textworld": importlib.metadata.version("textworld")}
    assert m["versions"]["alfworld"] == "0.4.2"  # the pinned version (requirements.txt) the numbers use
    assert m["root"] == str(DATA.resolve())
    assert m["splits"]["calib"] == {"tasks": 70, "games": 70, "maps_to": "valid_seen[::2]"}
    assert m["splits"]["train"]["games"] == 200
    with pytest.raises(SystemExit, match="asks for 71 test tasks but split 'test'.*has 70 games"):
        data.main(["--env", "alfworld", "--env-kwargs", json.dumps(kw), "--need", "test=71", "--out", str(out)])


def test_data_missing_says_how_to_provide_it(tmp_path, monkeypatch):
    from dmr import data
    from dmr.envs import alfworld

    # No source has anything: no ALFWORLD_DATA, and an empty shared copy.
    monkeypatch.delenv("ALFWORLD_DATA", raising=False)
    monkeypatch.setattr(alfworld, "SHARED_DATA", tmp_path / "shared")
    kw = json.dumps({"data": str(tmp_path / "alfworld"), "splits": SPLITS})
    out = tmp_path / "data.json"
    with pytest.raises(SystemExit, match=r"missing: .*valid_seen.*fetching is off.*alfworld-download.*"
                                         r"ALFWORLD_DATA.*env_kwargs.data"):
        data.main(["--env", "alfworld", "--env-kwargs", kw, "--no-fetch", "--out", str(out)])
    # Offline (what this machine is apart from package registries): the same advice, and no download.
    monkeypatch.setattr(alfworld, "_online", lambda *a, **k: False)
    with pytest.raises(SystemExit, match="github.com is not reachable.*ALFWORLD_DATA"):
        data.main(["--env", "alfworld", "--env-kwargs", kw, "--out", str(out)])
    assert not out.exists() and not (tmp_path / "alfworld").exists()
    # The default mapping needs train and valid_unseen, which this root (valid_seen only) lacks: the
    # message names them; asked for calib only, it checks calib only.
    root = _layout(tmp_path / "own", valid_seen=DATA / "json_2.1.1/valid_seen")
    with pytest.raises(SystemExit, match=r"missing: .*\{train,valid_unseen\} \(split train -> train, test -> "
                                         r"valid_unseen\).*alfworld-download"):
        alfworld.ensure_data(str(root), None, fetch=False)
    assert alfworld.ensure_data(str(root), None, fetch=False, keys=["calib"]) == root.resolve()
    data.main(["--env", "alfworld", "--env-kwargs", json.dumps({"data": str(root)}), "--no-fetch",
               "--need", "calib=140", "--out", str(out)])
    assert json.loads(out.read_text())["splits"] == {"calib": {"tasks": 140, "games": 140, "maps_to": "valid_seen"}}
    assert alfworld.ensure_data(str(DATA), SPLITS, fetch=False) == DATA.resolve()


@pytest.mark.skipif(not (SHARED / "train.tar.xz").is_file(), reason="needs the shared copy's train.tar.xz")
def test_data_builds_one_root_from_the_shared_copy(tmp_path, monkeypatch):
    """config/alfworld.yaml's data: train unpacked from the shared archive and valid_seen linked into
    a root of our own (idempotent, counted), the test split resolved to valid_unseen only where a
    source has it, and what the check found recorded in data.json."""
    from dmr import data
    from dmr.envs import alfworld

    monkeypatch.delenv("ALFWORLD_DATA", raising=False)
    monkeypatch.setattr(alfworld, "SHARED_DATA", SHARED)
    root, out = tmp_path / "data/alfworld", tmp_path / "data.json"
    args = ["--env", "alfworld", "--env-kwargs", json.dumps({"data": str(root), "splits": PAPER_SPLITS}),
            "--no-fetch", "--need", "train=1000", "calib=70", "test=all", "--out", str(out)]
    data.main(args)
    m = json.loads(out.read_text())
    assert m["splits"] == {"train": {"tasks": 1000, "games": 3553, "maps_to": "train"},
                           "calib": {"tasks": 70, "games": 70, "maps_to": "valid_seen[::2]"},
                           "test": {"tasks": 70, "games": 70, "maps_to": "valid_seen[1::2]"}}
    games = root / "json_2.1.1"
    assert not games.joinpath("train").is_symlink() and games.joinpath("valid_seen").is_symlink()
    assert m["origins"]["train"] == f"unpacked from {SHARED / 'train.tar.xz'}"
    assert sorted(p.name for p in games.iterdir()) == ["train", "valid_seen"]  # nothing else, no temp folder
    stamp = games.joinpath("train").stat().st_mtime_ns
    data.main(args)  # idempotent: nothing unpacked again
    assert games.joinpath("train").stat().st_mtime_ns == stamp and json.loads(out.read_text()) == m
    # An unpack found incomplete is redone; a linked split with the wrong count is refused.
    for trial in sorted(games.glob("train/*/*"))[:3]:
        import shutil

        shutil.rmtree(trial)
    assert alfworld.ensure_data(str(root), PAPER_SPLITS, fetch=False) and alfworld.count_games(games / "train") == 3553
    user = _layout(tmp_path / "user", valid_unseen=(DATA / "json_2.1.1/valid_seen", 5))
    monkeypatch.setenv("ALFWORLD_DATA", str(user))
    with pytest.raises(SystemExit, match="'valid_unseen' at .* has 5 playable games, not 134"):
        data.main(args)
    # A user's valid_unseen (here 134 games made from valid_seen's) becomes the test split.
    user = _layout(tmp_path / "user2", valid_unseen=(DATA / "json_2.1.1/valid_seen", 134))
    monkeypatch.setenv("ALFWORLD_DATA", str(user))
    data.main(args)
    m = json.loads(out.read_text())
    assert m["splits"]["test"] == {"tasks": 134, "games": 134, "maps_to": "valid_unseen"}
    assert (games / "valid_unseen").resolve() == (user / "json_2.1.1/valid_unseen").resolve()
    with pytest.raises(SystemExit, match="asks for 71 calib tasks"):
        data.main(args[:-5] + ["calib=71", "--out", str(out)])


def test_fewshot_prefix_by_name():
    from dmr.envs.alfworld import fewshot
    from dmr.prompts import get

    assert get("react", fewshot="alfworld").prefix == fewshot()
    with pytest.raises(ValueError, match=r"no file .*nonesuch_fewshot.txt; known names: \['alfworld'\]"):
        get("react", fewshot="nonesuch")
    with pytest.raises(ValueError, match="not both"):
        get("react", fewshot="alfworld", prefix="x")


def test_thinking_expert_and_expert_data_cycle_over_a_small_split(tmp_path, capsys):
    """The expert thinks first (the few-shot examples' plan line), then wins; expert data larger
    than the split cycles over its games; every label names the expert that gave it, and the log
    reports how often the walkthrough or planner had to help."""
    from dmr import expert
    from dmr.envs.alfworld import plan_thought

    kw = {"data": str(DATA), "splits": {"train": "valid_train[:3]"}, "expert_thinks": True, "max_steps": 40}
    out = tmp_path / "eps.jsonl"
    expert.main(["--env", "alfworld", "--env-kwargs", json.dumps(kw), "--episodes", "4", "--noise", "0.3",
                 "--clean-fraction", "0.75", "--out", str(out)])
    eps = expert.read_episodes(out)
    sources = [[s["source"] for s in ep["steps"]] for ep in eps]
    assert all(src[0] == "plan" and set(src[1:]) <= {"handcoded", "walkthrough", "planner"} for src in sources)
    helped = sum(bool({"walkthrough", "planner"} & set(src)) for src in sources)
    assert f"labelled steps of {helped} of 4 episodes" in capsys.readouterr().out
    assert [e["task"] for e in eps] == ["alfworld/train/0", "alfworld/train/1", "alfworld/train/2", "alfworld/train/0"]
    e = make(**{k: v for k, v in kw.items() if k != "data"})
    for ep in eps[:3]:  # clean: think, then the expert's actions to the win
        game = e.games("train")[int(ep["task"].rsplit("/", 1)[1])]
        assert ep["won"] and ep["steps"][0]["label"] == ep["steps"][0]["action"] == plan_thought(game)
        assert ep["steps"][0]["next_obs"] == "OK." and not ep["steps"][1]["label"].startswith("think:")
    assert eps[3]["steps"][0]["label"].startswith("think: To solve the task")
    assert eps[3]["steps"] != eps[0]["steps"]  # the noisy second pass differs
    e.close()


def test_ao_and_as_labels():
    """AO places tau on actions only and labels only actions; AS uses every step."""
    import polars as pl

    from dmr.labels import label_sets

    rows = []
    for ep in range(20):
        for t in range(6):
            think = t == 0
            rows.append({"task": f"alfworld/train/{ep}", "step": t, "step_type": "think" if think else "action",
                         "kl": 0.5 + 0.01 * ep if think else 10.0 ** (-4 + (ep * 6 + t) % 7 * 0.5)})
    out, s = label_sets(pl.DataFrame(rows), ["action"], min_positive=0.02, sparse=0.1, fallback_positive=0.2)
    assert out.height == 120 and s["step_types"] == {"action": 100, "think": 20}
    assert s["ao"]["steps"] == 100 and s["as"]["steps"] == 120 and s["as"]["step_types"] == ["action", "think"]
    think = out.filter(pl.col("step_type") == "think")
    assert think["label_ao"].null_count() == 20 and think["label_as"].null_count() == 0
    act = out.filter(pl.col("step_type") == "action")
    assert (act["label_ao"] == (act["kl"] > s["ao"]["tau"])).all()
    assert (out["label_as"] == (out["kl"] > s["as"]["tau"])).all()
    assert s["ao"]["tau"] != s["as"]["tau"]


# ---------------------------------------------------------------------- the real-ALFWorld cells
ROOT = Path(__file__).resolve().parents[1]


def _snakemake(config: str, cwd: Path, *args):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--directory", str(cwd),
                           "--configfile", str(ROOT / config), *args], capture_output=True, text=True, timeout=1800)


def _alfworld_config(name="alfworld"):
    """config/<name>.yaml as a mapping: the cell's config, or one of its overlays."""
    import yaml

    return yaml.safe_load((ROOT / f"config/{name}.yaml").read_text())


def test_alfworld_config_dry_run(tmp_path):
    r = _snakemake("config/alfworld.yaml", tmp_path, "-n", "-p")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout + r.stderr
    # the shipped agent: no training, but expert episodes still calibrate quantization: as many as
    # the calibration asks for, not the agent's training data
    for rule in ("data", "expert_data", "quantize", "rollout", "kl", "labels", "klst", "evaluate"):
        assert f"\nrule {rule}:" in out or f"\nlocalrule {rule}:" in out, rule
    assert "\nrule train_agent:" not in out
    assert f"--model bf16={ROOT / 'agents/tiny_alfworld'} --policy full" in out
    cfg = _alfworld_config()
    calib, route = cfg["models"]["tiny_alfworld"]["quantize"]["calibration"], cfg["route"]
    assert calib["samples"] <= calib["episodes"] < cfg["benchmarks"]["alfworld"]["tasks"]["train"]
    assert f"--episodes {calib['episodes']} " in out
    assert "--block 50 --workers 2 --out results/alfworld/tiny_alfworld/bc/episodes.jsonl" in out
    # the KL pool follows the agent's expert games, and the data check asks for the train games to its end
    assert route["kl_offset"] >= cfg["benchmarks"]["alfworld"]["tasks"]["train"]
    assert f"--split train --n {route['kl_tasks']} --offset {route['kl_offset']} " in out
    assert f"--need calib=70 test=all train={route['kl_offset'] + route['kl_tasks']}" in out
    assert "--split test --n all --offset 0" in out and '"test": ["valid_unseen", "valid_seen[1::2]"]' in out
    assert f'"data": "{ROOT / "data/alfworld"}"' in out  # the data root resolved against the repository


def test_alfworld_agent_overlay_dry_run(tmp_path):
    """`make agent-alfworld`: the overlay trains the agent from the recipe and installs its card."""
    r = _snakemake("config/alfworld.yaml", tmp_path, str(ROOT / "config/alfworld-agent.yaml"), "-n", "-p", "agents")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout + r.stderr
    for rule in ("expert_data", "train_agent", "select_rollout", "select_agent", "agent_card", "agents"):
        assert f"\nrule {rule}:" in out or f"\nlocalrule {rule}:" in out, rule
    cfg = _alfworld_config()
    assert f"--episodes {cfg['benchmarks']['alfworld']['tasks']['train']} " in out
    assert f"--steps {cfg['models']['tiny_alfworld']['train']['steps']} " in out and "--snapshot-at 0.5,0.75 " in out
    assert "dmr.card install results/alfworld/tiny_alfworld/card --to agents" in out


def test_alfworld_regime_overlay_dry_run(tmp_path):
    """The screen's overlay: its pool of train games past the agent's expert games, then per scheme
    quantization, KL and a Quant run of the test split, and the regime table."""
    r = _snakemake("config/alfworld.yaml", tmp_path, str(ROOT / "config/alfworld-regime.yaml"), "-n", "-p", "regime")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out, cfg = r.stdout + r.stderr, _alfworld_config()
    kl_tasks = _alfworld_config("alfworld-regime")["route"]["kl_tasks"]
    assert f"--split train --n {kl_tasks} --offset {cfg['route']['kl_offset']} " in out
    for scheme in ("rtn_w2a16", "rtn_w2a16_qkvw4", "rtn_w2a16_attnw3"):
        assert f"--out results/alfworld/tiny_alfworld/{scheme}/rollouts/quant/seed0 " in out, scheme
    assert "results/alfworld/tiny_alfworld/tables/regime.md" in out


def _ablations_dry_run(tmp_path, overlay):
    """`snakemake -n -p ablations` of the cell with config/<overlay>.yaml: its printed plan and the
    routed scheme's results folder."""
    r = _snakemake("config/alfworld.yaml", tmp_path, str(ROOT / f"config/{overlay}.yaml"), "-n", "-p", "ablations")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (scheme,) = _alfworld_config()["cells"][0]["route"]
    return r.stdout + r.stderr, f"results/alfworld/tiny_alfworld/{scheme}"


def test_alfworld_table5_overlay_dry_run(tmp_path):
    """Table 5's overlay: one all-step router (labels from the all-step tau, trained on every step) with
    its calibration and routed runs, paired with the cell's own action-only router and DMR runs."""
    out, cell = _ablations_dry_run(tmp_path, "alfworld-table5")
    (k,) = _alfworld_config("alfworld-table5")["route"]["ablation"]["online"]["budgets"]
    assert out.count("\nrule klst_variant:") == 1 and "--step-types all --labels-summary " in out and "--label-set as" in out
    assert f"--out {cell}/ablation/steps-as/rollouts/dmr-k{k:g}/seed0 " in out
    assert f"--out {cell}/ablation/steps-as/rollouts/dmr-t0.5/calib " in out
    assert "ablation/steps-ao" not in out and "ablation/depth" not in out and "ablation/tau-" not in out
    assert f"--reference {k:g} {cell}/rollouts/dmr-k{k:g}/seed0 --online steps-ao {k:g} {cell}/rollouts/dmr-k{k:g}/seed0 " in out


def test_alfworld_encoders_overlay_dry_run(tmp_path):
    """The step-encoder overlay: a proposal router (the low model's proposal, window 1) and Table 5's
    all-step router, each calibrated and routed at every budget, paired with the cell's own text router
    and DMR runs (encoder-text and steps-ao are the cell's router, not retrained)."""
    out, cell = _ablations_dry_run(tmp_path, "alfworld-encoders")
    budgets = _alfworld_config("alfworld-encoders")["route"]["ablation"]["online"]["budgets"]
    assert budgets == _alfworld_config()["route"]["budgets"]
    assert out.count("\nrule klst_variant:") == 2
    assert '"encoder": "proposal"' in out and '"window": 1' in out and f"--low {cell}/model " in out
    assert "ablation/encoder-text" not in out and "ablation/steps-ao" not in out and "ablation/depth" not in out
    for k in budgets:
        for variant in ("encoder-proposal", "steps-as"):
            assert f"--out {cell}/ablation/{variant}/rollouts/dmr-k{k:g}/seed0 " in out
        assert f"--online encoder-text {k:g} {cell}/rollouts/dmr-k{k:g}/seed0 " in out


@pytest.mark.slow
@pytest.mark.long
def test_micro_alfworld_end_to_end(tmp_path):
    """The micro real-ALFWorld cell through the whole DAG on the CPU: data check, expert data on
    real games, tiny agent, quantization, KL pool, AO/AS labels, threshold, router, calibration,
    routed evaluation and the table."""
    import polars as pl

    r = _snakemake("config/alfworld-micro.yaml", tmp_path, "--cores", "2")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    cell = tmp_path / "results/alfworld/tiny"
    manifest = json.loads((tmp_path / "results/alfworld/data.json").read_text())
    assert manifest["versions"]["alfworld"] == importlib.metadata.version("alfworld")
    test_split = manifest["splits"]["test"]["maps_to"]
    assert manifest["splits"]["train"]["maps_to"] == "train" and test_split in ("valid_unseen", "valid_seen[1::2]")
    eps = [json.loads(x) for x in (cell / "bc/episodes.jsonl").read_text().splitlines()]
    assert len(eps) == 8 and all(e["steps"][0]["label"].startswith("think: ") for e in eps)
    pool = pl.read_parquet(cell / "bf16/rollouts/full/train/episodes.parquet")
    assert pool.height == 10 and set(pool["split"]) == {"train"}
    run = json.loads((cell / "bf16/rollouts/full/seed0/run.json").read_text())
    assert run["env_versions"]["alfworld"] == manifest["versions"]["alfworld"]
    assert run["agent"]["prompt"] == {"style": "react", "fewshot": "alfworld"}
    steps = pl.read_parquet(cell / "bf16/rollouts/full/seed0/steps.parquet")
    assert steps["observation"][0].startswith("You are in the middle of a room.")
    kls = pl.read_parquet(cell / "gptq_w4a16/kl/steps.parquet")
    assert kls.height == pl.read_parquet(cell / "bf16/rollouts/full/train/steps.parquet").height
    labels = pl.read_parquet(cell / "gptq_w4a16/kl/labels.parquet")
    summary = json.loads((cell / "gptq_w4a16/kl/labels.json").read_text())
    assert labels.height == kls.height and {"label_ao", "label_as", "tau_ao", "tau_as"} <= set(labels.columns)
    assert labels["label_as"].null_count() == 0
    assert labels.filter(pl.col("step_type") != "action")["label_ao"].null_count() == \
        labels.filter(pl.col("step_type") != "action").height
    assert summary["as"]["steps"] == kls.height
    assert json.loads((cell / "gptq_w4a16/router/metrics.json").read_text())["params"]["router"] > 0
    assert "0.4" in json.loads((cell / "gptq_w4a16/router/calibration.json").read_text())["thresholds"]
    table = pl.read_parquet(cell / "tables/main.parquet")
    assert table["method"].to_list() == ["Full", "Quant", "DMR", "GRPO", "Random"]
    assert set(table["episodes"]) == {3}
    assert f"Game versions: alfworld {manifest['versions']['alfworld']}" in (cell / "tables/main.md").read_text()
    assert f"Benchmark splits: test = {test_split}." in (cell / "tables/main.md").read_text()
    assert run["env_splits"]["test"] == test_split


def test_tables_never_mix_game_versions(tmp_path):
    from dmr.evaluate import env_versions

    def run(name, versions):
        d = tmp_path / name
        d.mkdir()
        (d / "run.json").write_text(json.dumps({"env": "alfworld"} | ({"env_versions": versions} if versions else {})))
        return d / "episodes.parquet"

    v4 = {"alfworld": "0.4.2", "textworld": "1.7.0"}
    a, b, household = run("a", v4), run("b", dict(v4)), run("h", None)
    assert env_versions({"Full": [a], "Quant": [b, household]}) == v4
    assert env_versions({"Full": [household]}) == {}
    c = run("c", {"alfworld": "0.3.5", "textworld": "1.6.1"})
    with pytest.raises(SystemExit, match="different game versions in one table.*0.3.5"):
        env_versions({"Full": [a], "Quant": [c]})


def test_tables_name_and_never_mix_benchmark_splits(tmp_path):
    from dmr.evaluate import env_splits

    def run(name, split, resolved):
        d = tmp_path / name
        d.mkdir()
        (d / "run.json").write_text(json.dumps({"env": "alfworld", "split": split}
                                               | ({"env_splits": resolved} if resolved else {})))
        return d / "episodes.parquet"

    unseen = {"train": "train", "calib": "valid_seen[::2]", "test": "valid_unseen"}
    a, b, household = run("a", "test", unseen), run("b", "test", dict(unseen)), run("h", "test", None)
    assert env_splits({"Full": [a], "Quant": [b, household]}) == {"test": "valid_unseen"}
    assert env_splits({"Full": [household]}) == {}
    c = run("c", "test", unseen | {"test": "valid_seen[1::2]"})
    with pytest.raises(SystemExit, match=r"different benchmark splits in one table: test: valid_unseen .*valid_seen\[1::2\]"):
        env_splits({"Full": [a], "Quant": [c]})


def test_all_tasks_needs_a_fixed_split(tmp_path):
    """`--n all` (tasks.test: all) plays every task of a fixed split; a generated benchmark refuses it."""
    from dmr import agent

    with pytest.raises(SystemExit, match="--n all needs a benchmark with fixed splits; household"):
        agent.main(["--env", "household", "--n", "all", "--model", "bf16=nowhere", "--out", str(tmp_path / "r")])
