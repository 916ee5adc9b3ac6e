import random
import re

import pytest

from dmr.envs.base import SPLITS, Env, Task, split_seed
from dmr.envs.household import (
    APPLIANCE,
    LAMP,
    OPENABLE,
    TASK_TYPES,
    HouseholdEnv,
    _listing,
    kind,
    natural_key,
)

from tests.env_contract import check_contract

NEEDED_STATE = {"pick_heat_then_place": "hot", "pick_cool_then_place": "cold",
                "pick_clean_then_place": "clean"}


def goal_met(snap: dict, info: dict) -> bool:
    """Independent re-check of the goal from the full state, not using the env's own check."""
    tt, g, target = info["task_type"], info["goal_object"], info["target"]
    if tt == "look_at_obj_in_light":
        held = snap["held"]
        return bool(snap["lamp_on"] and held and kind(held) == g and snap["location"] == snap["lamp_at"])
    need = NEEDED_STATE.get(tt)
    want = 2 if tt == "pick_two_obj_and_place" else 1
    for r, objs in snap["contents"].items():
        if kind(r) == target:
            hits = [o for o in objs if kind(o) == g and (need is None or o in snap[need])]
            if len(hits) >= want:
                return True
    return False


def play(env, task, p_random=0.0, rng=None):
    """Run the expert (with random admissible actions injected at p_random); return (won, steps, info)."""
    obs = env.reset(task)
    admissible = obs.admissible
    while True:
        if p_random and rng.random() < p_random:
            action = rng.choice(admissible)
        else:
            action = env.expert_action()
            assert action in admissible, (task, action)
        tr = env.step(action)
        assert tr.valid
        admissible = tr.admissible
        if tr.done:
            assert tr.won == goal_met(env.snapshot(), obs.info), task
            assert tr.score == (1.0 if tr.won else 0.0)
            return tr.won, tr.info["steps"], obs.info


def find(env, pred, split="test", limit=2000):
    for task in env.tasks(split, limit):
        obs = env.reset(task)
        if pred(env.snapshot(), obs.info):
            return task, obs
    raise AssertionError("no task matches")


def assert_nothing_happens(env, action):
    before = env.snapshot()
    adm_before = env._admissible[:]
    tr = env.step(action)
    after = env.snapshot()
    assert tr.text == "Nothing happens."
    assert tr.valid is False and tr.won is False and tr.score == 0.0
    assert tr.admissible == adm_before
    assert after["steps"] == before["steps"] + 1
    before.pop("steps"), after.pop("steps")
    assert after == before
    return tr


# ---------------------------------------------------------------- protocol and splits

def test_protocol_and_tasks():
    env = HouseholdEnv()
    assert isinstance(env, Env)
    assert env.name == "household" and env.max_steps == 50
    tasks = env.tasks("train", 5, offset=10)
    assert [t.index for t in tasks] == list(range(10, 15))
    for t in tasks:
        assert t.benchmark == "household" and t.split == "train"
        assert t.seed == split_seed("train", t.index)
        assert t.task_type in TASK_TYPES
        assert env.reset(t).info["task_type"] == t.task_type
    with pytest.raises(ValueError):
        env.tasks("dev", 1)
    with pytest.raises(ValueError):
        HouseholdEnv(task_types=["pick_and_fly"])


def test_contract():
    check_contract(HouseholdEnv, n=5)
    check_contract(HouseholdEnv, split="calib", n=2)


def test_task_types_filter_and_override():
    env = HouseholdEnv(task_types=["look_at_obj_in_light"])
    assert {t.task_type for t in env.tasks("test", 50)} == {"look_at_obj_in_light"}
    # A Task's own type wins over the env's filter, so a Task always rebuilds the same goal.
    t = Task("household", "test", 3, split_seed("test", 3), task_type="pick_heat_then_place")
    assert env.reset(t).info["task_type"] == "pick_heat_then_place"
    with pytest.raises(ValueError):
        env.reset(Task("household", "test", 3, split_seed("test", 3), task_type="nope"))


def test_splits_disjoint_and_rebuildable():
    env = HouseholdEnv()
    seeds = {s: {t.seed for t in env.tasks(s, 3000)} for s in SPLITS}
    assert all(len(v) == 3000 for v in seeds.values())
    assert not seeds["train"] & seeds["calib"]
    assert not seeds["train"] & seeds["test"]
    assert not seeds["calib"] & seeds["test"]

    # Two independent envs rebuilding the same Task see the same episode, step by step.
    a, b = HouseholdEnv(), HouseholdEnv()
    for task in a.tasks("calib", 40, offset=7):
        oa, ob = a.reset(task), b.reset(task)
        assert (oa.text, oa.goal, oa.admissible, oa.info) == (ob.text, ob.goal, ob.admissible, ob.info)
        while True:
            act = a.expert_action()
            assert act == b.expert_action()
            ta, tb = a.step(act), b.step(act)
            assert (ta.text, ta.admissible, ta.done, ta.won) == (tb.text, tb.admissible, tb.done, tb.won)
            if ta.done:
                break
    # Different splits give different rooms for the same index.
    texts = {env.reset(env.tasks(s, 1, offset=5)[0]).text for s in SPLITS}
    assert len(texts) > 1


def test_generation_invariants():
    env = HouseholdEnv()
    for task in env.tasks("train", 600):
        obs = env.reset(task)
        snap, info = env.snapshot(), obs.info
        tt, g, target = info["task_type"], info["goal_object"], info["target"]
        receps = list(snap["contents"])
        assert 8 <= len(receps) <= 12
        assert receps == sorted(receps, key=natural_key)
        objs = [o for c in snap["contents"].values() for o in c if o != LAMP]
        assert 5 <= len(objs) <= 10 and len(set(objs)) == len(objs)
        goal_objs = [o for o in objs if kind(o) == g]
        assert len(goal_objs) >= (2 if tt == "pick_two_obj_and_place" else 1)
        if tt == "look_at_obj_in_light":
            assert target is None and snap["lamp_at"] is not None
            assert LAMP in snap["contents"][snap["lamp_at"]]
        else:
            assert any(kind(r) == target for r in receps)
            for r, c in snap["contents"].items():
                if kind(r) == target:
                    assert not any(kind(o) == g for o in c), task
        if tt in APPLIANCE:
            verb, app = APPLIANCE[tt]
            assert f"{app} 1" in receps and target != app
        assert all(not v for v in snap["open"].values())
        assert set(snap["open"]) == {r for r in receps if kind(r) in OPENABLE}
        assert not goal_met(snap, info)


# ---------------------------------------------------------------- expert

def test_expert_solves_1000_test_tasks():
    env = HouseholdEnv()
    by_type: dict[str, list[int]] = {}
    for task in env.tasks("test", 1000, offset=0):
        won, steps, info = play(env, task)
        assert won, task
        assert steps <= env.max_steps
        by_type.setdefault(info["task_type"], []).append(steps)
    assert set(by_type) == set(TASK_TYPES)
    all_steps = [s for v in by_type.values() for s in v]
    assert sum(all_steps) / len(all_steps) < 15


def test_expert_recovers_from_random_actions():
    env = HouseholdEnv()
    rng = random.Random(1234)
    wins = [play(env, task, p_random=0.2, rng=rng)[0] for task in env.tasks("test", 300)]
    assert sum(wins) / len(wins) >= 0.95


def test_expert_only_uses_observed_information():
    env = HouseholdEnv()
    for task in env.tasks("calib", 200):
        obs = env.reset(task)
        seen_text = obs.text
        while True:
            action = env.expert_action()
            m = re.fullmatch(r"take (.+) from (.+)", action)
            if m:
                assert re.search(rf"\b{re.escape(m.group(1))}\b", seen_text), (task, action)
            if action.startswith("use "):
                assert LAMP in seen_text
            tr = env.step(action)
            seen_text += "\n" + tr.text
            if tr.done:
                break


def test_expert_help_report():
    """The expert data's log line: time per episode, and (where the environment names its labels'
    expert) the share of episodes that needed the walkthrough or planner, and labels by source."""
    from dmr.expert import help_report

    assert help_report([{"steps": []}] * 4, 10.0) == "4 expert episodes in 10 s (2.50 s each)"
    eps = [{"steps": [{"source": "plan"}, {"source": "handcoded"}, {"source": "handcoded"}]},
           {"steps": [{"source": "plan"}, {"source": "handcoded"}, {"source": "planner"}]},
           {"steps": [{"source": "plan"}, {"source": "walkthrough"}, {"source": "walkthrough"}]},
           {"steps": [{"source": "plan"}, {"source": "handcoded"}, {"source": "handcoded"}]}]
    assert help_report(eps, 8.0) == (
        "4 expert episodes in 8 s (2.00 s each); the walkthrough or planner labelled steps of 2 of 4 episodes "
        "(50.0%); labels by source: handcoded 41.7%, plan 33.3%, planner 8.3%, walkthrough 16.7%")


def test_expert_data_skips_an_episode_the_expert_cannot_label(tmp_path, monkeypatch, capsys):
    """An expert failure (ExpertFailed) costs its episode, named in the log, not the run."""
    from dmr import envs, expert

    class Failing(HouseholdEnv):
        def expert_action(self):
            if self._task.key.endswith("/1"):
                raise envs.ExpertFailed("no plan for this one")
            return super().expert_action()

    monkeypatch.setattr(envs, "make", lambda name, **kw: Failing(**kw))
    out = tmp_path / "eps.jsonl"
    expert.main(["--env", "household", "--episodes", "3", "--out", str(out)])
    eps = expert.read_episodes(out)
    assert [e["task"].rsplit("/", 1)[1] for e in eps] == ["0", "2"] and all(e["won"] for e in eps)
    log = capsys.readouterr().out
    assert "skipped 1 of 3 episodes where the expert failed: household/train/1" in log
    assert "2/2 expert episodes won" in log


def test_expert_blocks_do_not_depend_on_workers(tmp_path):
    """--block cuts the episodes into noise streams that --workers processes play side by side: the
    file is the same for any number of workers, and a block as long as the run is the one stream."""
    from dmr import expert

    def data(*flags):
        out = tmp_path / f"eps{'_'.join(flags)}.jsonl"
        expert.main(["--env", "household", "--episodes", "12", "--noise", "0.5", "--repeat", "0.3",
                     "--invalid", "0.3", *flags, "--out", str(out)])
        return out.read_text()

    one = data()
    assert data("--block", "12") == one
    blocks = data("--block", "4")
    assert blocks != one and len(blocks.splitlines()) == 12
    assert data("--block", "4", "--workers", "2") == blocks
    with pytest.raises(SystemExit):  # workers without blocks would silently play one stream
        data("--workers", "2")


def test_expert_needs_running_episode():
    env = HouseholdEnv()
    with pytest.raises(RuntimeError):
        env.expert_action()
    with pytest.raises(RuntimeError):
        env.step("look")


# ---------------------------------------------------------------- invalid actions and episode end

def test_bad_actions_do_nothing_but_count():
    env = HouseholdEnv()
    task, obs = find(env, lambda s, i: any(len([o for o in c if o != LAMP]) >= 2
                                           for r, c in s["contents"].items() if r not in s["open"]))
    snap = env.snapshot()
    spot = next(r for r, c in snap["contents"].items()
                if r not in snap["open"] and len([o for o in c if o != LAMP]) >= 2)
    for bad in ["", "   ", "xyzzy", "go to", "go to bathtub 1", "take apple 99 from " + spot,
                "open countertop 1", "use desklamp 7", "move mug 1 to nowhere 1"]:
        assert_nothing_happens(env, bad)
    tr = env.step(f"go to {spot}")
    assert tr.valid and tr.text.startswith(f"You arrive at {spot}.")
    assert_nothing_happens(env, f"go to {spot}")  # already there
    first, second = [o for o in env.snapshot()["contents"][spot] if o != LAMP][:2]
    tr = env.step(f"  TAKE {first.upper()} from {spot}  ")  # case and outer spaces are forgiven
    assert tr.valid and tr.text == f"You pick up the {first} from the {spot}."
    assert_nothing_happens(env, f"take {second} from {spot}")  # hands are full
    assert_nothing_happens(env, f"take {first} from {spot}")
    assert env.snapshot()["steps"] == 14


def test_episode_ends_at_max_steps_and_then_raises():
    env = HouseholdEnv(max_steps=6)
    env.reset(env.tasks("test", 1)[0])
    for i in range(5):
        tr = env.step("garbage" if i % 2 else "look")
        assert not tr.done
    tr = env.step("nonsense")
    assert tr.done and not tr.won and tr.score == 0.0 and not tr.valid
    with pytest.raises(RuntimeError, match="ended"):
        env.step("look")
    with pytest.raises(RuntimeError):
        env.expert_action()
    # reset starts over
    obs = env.reset(env.tasks("test", 1)[0])
    assert env.step("look").text == obs.text


# ---------------------------------------------------------------- observations

def test_closed_receptacles_hide_contents_until_opened():
    env = HouseholdEnv()
    task, _ = find(env, lambda s, i: any(c for r, c in s["contents"].items() if r in s["open"]))
    snap = env.snapshot()
    box = next(r for r, c in snap["contents"].items() if r in snap["open"] and c)
    inside = snap["contents"][box]
    tr = env.step(f"go to {box}")
    assert tr.text == f"You arrive at {box}. The {box} is closed."
    assert not any(a.startswith("take ") for a in tr.admissible)
    assert f"open {box}" in tr.admissible and f"close {box}" not in tr.admissible
    assert env.step(f"examine {box}").text == f"The {box} is closed."
    tr = env.step(f"open {box}")
    assert tr.text == f"You open the {box}. The {box} is open. In it, you see {_listing(inside)}."
    assert all(f"take {o} from {box}" in tr.admissible for o in inside)
    assert f"close {box}" in tr.admissible and f"open {box}" not in tr.admissible
    other = next(r for r in snap["contents"] if r != box)
    env.step(f"go to {other}")
    tr = env.step(f"go to {box}")
    assert tr.text == f"You arrive at {box}. The {box} is open. In it, you see {_listing(inside)}."
    assert env.step(f"close {box}").text == f"You close the {box}."
    tr = env.step("look")
    assert tr.text == f"You are facing the {box}. Next to it, you see nothing."
    assert not any(a.startswith("take ") for a in tr.admissible)


def test_listing_wording():
    assert _listing([]) == "nothing"
    assert _listing(["mug 1"]) == "a mug 1"
    assert _listing(["mug 1", "apple 1"]) == "a apple 1, and a mug 1"
    assert _listing(["mug 1", "knife 2", "apple 1"]) == "a apple 1, a knife 2, and a mug 1"
    assert sorted(["cabinet 10", "cabinet 2", "cabinet 1"], key=natural_key) == [
        "cabinet 1", "cabinet 2", "cabinet 10"]


def test_observation_wording():
    env = HouseholdEnv()
    task, obs = find(env, lambda s, i: any(c and r not in s["open"] for r, c in s["contents"].items()))
    receps = list(env.snapshot()["contents"])
    listed = ", ".join(f"a {r}" for r in receps[:-1]) + f", and a {receps[-1]}"
    assert obs.text == f"You are in the middle of a room. Looking quickly around you, you see {listed}."
    assert obs.goal.startswith("Your task is to: ")
    assert obs.admissible == sorted(obs.admissible, key=natural_key)
    assert obs.admissible == sorted(["look", "inventory"] + [f"go to {r}" for r in receps], key=natural_key)
    assert env.step("look").text == obs.text
    assert env.step("inventory").text == "You are not carrying anything."

    snap = env.snapshot()
    surface = next(r for r, c in snap["contents"].items() if c and r not in snap["open"])
    tr = env.step(f"go to {surface}")
    assert tr.text == f"You arrive at {surface}. On the {surface}, you see {_listing(snap['contents'][surface])}."
    assert tr.admissible == sorted(tr.admissible, key=natural_key)
    assert f"go to {surface}" not in tr.admissible and f"examine {surface}" in tr.admissible
    obj = next(o for o in snap["contents"][surface] if o != LAMP)
    assert env.step(f"take {obj} from {surface}").text == f"You pick up the {obj} from the {surface}."
    tr = env.step("inventory")
    assert tr.text == f"You are carrying: a {obj}."
    assert f"move {obj} to {surface}" in tr.admissible and f"examine {obj}" in tr.admissible
    assert env.step(f"examine {obj}").text == f"There's nothing special about {obj}."
    assert env.step(f"move {obj} to {surface}").text == f"You move the {obj} to the {surface}."
    assert env.step("inventory").text == "You are not carrying anything."


@pytest.mark.parametrize("task_type,verb,app", [
    ("pick_heat_then_place", "heat", "microwave 1"),
    ("pick_cool_then_place", "cool", "fridge 1"),
    ("pick_clean_then_place", "clean", "sinkbasin 1"),
])
def test_appliance_wording(task_type, verb, app):
    env = HouseholdEnv(task_types=[task_type])
    for task in env.tasks("test", 5):
        obs = env.reset(task)
        g, target = obs.info["goal_object"], obs.info["target"]
        assert re.fullmatch(rf"Your task is to: ({verb} some {g} and put it in {target}|put a "
                            rf"(hot|cool|clean) {g} in {target})\.", obs.goal)
        while True:
            action = env.expert_action()
            tr = env.step(action)
            if action.startswith(verb + " "):
                held = env.snapshot()["held"]
                assert action == f"{verb} {held} with {app}"
                assert tr.text == f"You {verb} the {held} using the {app}."
                adjective = {"heat": "hot", "cool": "cold", "clean": "clean"}[verb]
                assert env.step(f"examine {held}").text == f"This is a {adjective} {held}."
            if tr.done:
                assert tr.won
                break


def test_look_at_wording_and_success():
    env = HouseholdEnv(task_types=["look_at_obj_in_light"])
    for task in env.tasks("test", 10):
        obs = env.reset(task)
        g = obs.info["goal_object"]
        assert obs.goal in (f"Your task is to: look at {g} under the desklamp.",
                            f"Your task is to: examine the {g} with the desklamp.")
        while True:
            action = env.expert_action()
            tr = env.step(action)
            if tr.done:
                assert action == "use desklamp 1" and tr.text == "You turn on the desklamp 1."
                assert tr.won and kind(env.snapshot()["held"]) == g
                break
    # Turning the lamp on empty-handed is not enough.
    obs = env.reset(env.tasks("test", 1)[0])
    lamp_at = env.snapshot()["lamp_at"]
    env.step(f"go to {lamp_at}")
    tr = env.step("use desklamp 1")
    assert tr.valid and not tr.won
    assert all(not a.startswith("take desklamp") for a in tr.admissible)


def test_place_goal_wording():
    env = HouseholdEnv(task_types=["pick_and_place", "pick_two_obj_and_place"])
    for task in env.tasks("test", 100):
        obs = env.reset(task)
        g, target = obs.info["goal_object"], obs.info["target"]
        if obs.info["task_type"] == "pick_and_place":
            prep = "in" if target in {"cabinet", "drawer", "fridge", "microwave", "garbagecan",
                                      "sinkbasin"} else "on"
            assert re.fullmatch(rf"Your task is to: put (a|some) {g} {prep} {target}\.", obs.goal)
        else:
            assert obs.goal in (f"Your task is to: put two {g} in {target}.",
                                f"Your task is to: find two {g} and put them in {target}.")


def test_expert_data_shows_recovery_from_repeated_actions():
    """dmr.expert's `repeat` noise re-executes the previous action: in the household grammar a
    repeated "go to X" or "take X" is answered "Nothing happens.", and the step after it is labelled
    with the expert's way on, so a cloned agent sees how to leave the loop it otherwise falls into."""
    from dmr.expert import episode

    env, rng = HouseholdEnv(), random.Random(0)
    repeats = nothing = recovered = 0
    for task in env.tasks("train", 40):
        ep = episode(env, task, noise=0.5, rng=rng, repeat=1.0)
        steps = ep["steps"]
        for prev, s, nxt in zip(steps, steps[1:], steps[2:]):
            if s["action"] == prev["action"] != s["label"]:
                repeats += 1
                nothing += s["next_obs"] == "Nothing happens."
                # the repeat is not supervised, the next step is, with an admissible expert action
                recovered += nxt["action"] == nxt["label"] and nxt["label"] in nxt["admissible"]
    assert repeats > 100 and nothing > 0.5 * repeats and recovered > 0.4 * repeats
    # `invalid` noise executes actions admissible in another episode but not here (a receptacle or
    # object this room lacks): the environment answers "Nothing happens." and the expert goes on.
    foreign = sorted({a for s in steps for a in s["admissible"]})
    shown = 0
    for task in env.tasks("train", 40, offset=40):
        ep = episode(env, task, noise=0.5, rng=rng, invalid=1.0, foreign=foreign)
        for s in ep["steps"]:
            if s["action"] != s["label"]:
                assert s["action"] not in s["admissible"] and s["action"] in foreign
                shown += s["next_obs"] == "Nothing happens."
    assert shown > 100
    # Without `repeat` the noise is admissible only: an invalid step never appears in the data.
    ep = [episode(env, t, noise=0.5, rng=random.Random(1)) for t in env.tasks("train", 20)]
    assert not any(s["next_obs"] == "Nothing happens." for e in ep for s in e["steps"])
