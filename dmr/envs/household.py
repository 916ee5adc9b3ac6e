"""HouseholdEnv: a procedurally generated text household in the style of ALFWorld 0.4.

The room, its objects and the goal are a pure function of the task seed, so any worker can
rebuild an episode from a `Task`. The built-in expert reads only what the agent could have
observed in this episode (plus its own hand), so it can relabel states reached by any policy,
DAgger-style, without peeking into unopened receptacles.
"""
from __future__ import annotations

import random
import re

from dmr.envs.base import Observation, Task, Transition, split_seed

TASK_TYPES = (
    "pick_and_place",
    "pick_two_obj_and_place",
    "look_at_obj_in_light",
    "pick_heat_then_place",
    "pick_cool_then_place",
    "pick_clean_then_place",
)
LOOK = "look_at_obj_in_light"
PICK_TWO = "pick_two_obj_and_place"
# task type -> (verb, appliance receptacle type)
APPLIANCE = {
    "pick_heat_then_place": ("heat", "microwave"),
    "pick_cool_then_place": ("cool", "fridge"),
    "pick_clean_then_place": ("clean", "sinkbasin"),
}

SINGLE_RECEPTACLES = (
    "coffeemachine", "desk", "diningtable", "dresser", "fridge", "garbagecan",
    "microwave", "sidetable", "sinkbasin", "toaster",
)
MULTI_RECEPTACLES = {"cabinet": 6, "countertop": 3, "drawer": 4, "shelf": 3, "stoveburner": 4}
OPENABLE = frozenset({"cabinet", "drawer", "fridge", "microwave"})
IN_PREPOSITION = frozenset({"cabinet", "drawer", "fridge", "microwave", "garbagecan", "sinkbasin"})
LAMP_HOSTS = frozenset({"countertop", "desk", "diningtable", "dresser", "shelf", "sidetable"})
PLACE_TARGETS = (
    "cabinet", "countertop", "desk", "diningtable", "drawer", "dresser", "fridge",
    "garbagecan", "microwave", "shelf", "sidetable", "sinkbasin",
)
# Receptacles that only make sense as a target for a few object types.
NARROW_TARGETS = {"coffeemachine": frozenset({"mug", "cup"}), "stoveburner": frozenset({"pan", "pot", "kettle"})}

HEATABLE = ("apple", "bread", "cup", "egg", "mug", "plate", "potato", "tomato")
COOLABLE = ("apple", "bread", "cup", "egg", "lettuce", "mug", "pan", "plate", "pot", "potato",
            "tomato", "winebottle")
CLEANABLE = ("apple", "bowl", "butterknife", "cloth", "cup", "dishsponge", "egg", "fork", "kettle",
             "knife", "ladle", "lettuce", "mug", "pan", "plate", "pot", "potato", "spatula", "spoon",
             "tomato")
LOOKABLE = ("alarmclock", "book", "bowl", "cd", "cellphone", "creditcard", "keychain", "pen",
            "pencil", "remotecontrol", "statue", "vase", "watch")
OTHER_OBJECTS = ("candle", "peppershaker", "saltshaker", "soapbar", "spraybottle", "tissuebox")
ALL_OBJECTS = tuple(sorted(set(HEATABLE + COOLABLE + CLEANABLE + LOOKABLE + OTHER_OBJECTS)))
GOAL_OBJECTS = {
    "pick_and_place": ALL_OBJECTS,
    PICK_TWO: ALL_OBJECTS,
    LOOK: LOOKABLE,
    "pick_heat_then_place": HEATABLE,
    "pick_cool_then_place": COOLABLE,
    "pick_clean_then_place": CLEANABLE,
}
LAMP = "desklamp 1"
MAX_PER_RECEPTACLE = 4
NOTHING_HAPPENS = "Nothing happens."

_DIGITS = re.compile(r"(\d+)")


def natural_key(s: str) -> tuple:
    """Sort key that orders "cabinet 2" before "cabinet 10"."""
    return tuple(int(t) if t.isdigit() else t for t in _DIGITS.split(s))


def kind(name: str) -> str:
    """The type of a receptacle or object id: 'cabinet 3' -> 'cabinet'."""
    return name.rsplit(" ", 1)[0]


def _listing(items) -> str:
    items = sorted(items, key=natural_key)
    if not items:
        return "nothing"
    if len(items) == 1:
        return f"a {items[0]}"
    return ", ".join(f"a {x}" for x in items[:-1]) + f", and a {items[-1]}"


def _goal_text(rng: random.Random, task_type: str, obj: str, target: str | None) -> str:
    variant = rng.random() < 0.5
    if task_type == "pick_and_place":
        prep = "in" if target in IN_PREPOSITION else "on"
        return f"put {'some' if variant else 'a'} {obj} {prep} {target}."
    if task_type == PICK_TWO:
        return f"find two {obj} and put them in {target}." if variant else f"put two {obj} in {target}."
    if task_type == LOOK:
        return f"examine the {obj} with the desklamp." if variant else f"look at {obj} under the desklamp."
    verb = APPLIANCE[task_type][0]
    adjective = {"heat": "hot", "cool": "cool", "clean": "clean"}[verb]
    return f"put a {adjective} {obj} in {target}." if variant else f"{verb} some {obj} and put it in {target}."


class HouseholdEnv:
    """One episode at a time over procedurally generated ALFWorld-like rooms (see module doc)."""

    name = "household"

    def __init__(self, max_steps: int = 50, n_receptacles: tuple[int, int] = (8, 12),
                 n_objects: tuple[int, int] = (5, 10), task_types=None):
        if max_steps < 1:
            raise ValueError("max_steps must be >= 1")
        self.max_steps = max_steps
        self.n_receptacles = tuple(n_receptacles)
        self.n_objects = tuple(n_objects)
        self.task_types = tuple(TASK_TYPES if task_types is None else task_types)
        unknown = [t for t in self.task_types if t not in TASK_TYPES]
        if unknown or not self.task_types:
            raise ValueError(f"task_types must be a non-empty subset of {TASK_TYPES}, got {task_types!r}")
        self._task: Task | None = None
        self._done = True

    # ------------------------------------------------------------------ tasks and generation
    def _draw_type(self, rng: random.Random) -> str:
        return rng.choice(self.task_types)

    def tasks(self, split: str, n: int, offset: int = 0) -> list[Task]:
        out = []
        for i in range(offset, offset + n):
            seed = split_seed(split, i)
            out.append(Task(benchmark=self.name, split=split, index=i, seed=seed,
                            task_type=self._draw_type(random.Random(seed))))
        return out

    def _generate(self, seed: int, task_type: str) -> None:
        rng = random.Random(seed)
        drawn = self._draw_type(rng)  # always consumed, so a forced type keeps the same stream
        tt = task_type or drawn
        if tt not in TASK_TYPES:
            raise ValueError(f"unknown task type {tt!r}")
        goal = rng.choice(GOAL_OBJECTS[tt])

        required: list[str] = []
        appliance = APPLIANCE[tt][1] if tt in APPLIANCE else None
        if appliance:
            required.append(appliance)
        if tt == LOOK:
            target = None
            required.append(rng.choice(("desk", "dresser", "sidetable")))
        else:
            # Cooling then storing in the fridge (etc.) is not an ALFWorld goal: exclude the appliance.
            choices = [t for t in PLACE_TARGETS if t != appliance]
            choices += [t for t, objs in NARROW_TARGETS.items() if goal in objs]
            target = rng.choice(choices)
            if target not in required:
                required.append(target)

        pool = list(SINGLE_RECEPTACLES) + [t for t, m in MULTI_RECEPTACLES.items() for _ in range(m)]
        for t in required:
            pool.remove(t)
        lo, hi = self.n_receptacles
        n = min(max(rng.randint(lo, hi), len(required) + 1), len(required) + len(pool))
        chosen = required + rng.sample(pool, n - len(required))
        counts: dict[str, int] = {}
        for t in chosen:
            counts[t] = counts.get(t, 0) + 1
        receptacles = sorted((f"{t} {i}" for t, c in counts.items() for i in range(1, c + 1)), key=natural_key)

        lo, hi = self.n_objects
        n_goal = 2 if tt == PICK_TWO else 1
        if rng.random() < 0.3:
            n_goal += 1
        n_obj = max(rng.randint(lo, hi), n_goal)
        types = [goal] * n_goal + [rng.choice(ALL_OBJECTS) for _ in range(n_obj - n_goal)]
        contents: dict[str, list[str]] = {r: [] for r in receptacles}
        numbering: dict[str, int] = {}
        for t in types:
            numbering[t] = numbering.get(t, 0) + 1
            obj = f"{t} {numbering[t]}"
            # A goal object never starts in a target receptacle, so no episode is won by default.
            eligible = [r for r in receptacles if not (t == goal and kind(r) == target)]
            roomy = [r for r in eligible if len(contents[r]) < MAX_PER_RECEPTACLE]
            contents[rng.choice(roomy or eligible)].append(obj)

        lamp_at = None
        if tt == LOOK or rng.random() < 0.3:
            hosts = [r for r in receptacles if kind(r) in LAMP_HOSTS]
            if hosts:
                lamp_at = rng.choice(hosts)
                contents[lamp_at].append(LAMP)

        self._task_type = tt
        self._goal_obj = goal
        self._target = target
        self._goal = "Your task is to: " + _goal_text(rng, tt, goal, target)
        self._receptacles = receptacles
        self._contents = contents
        self._lamp_at = lamp_at

    # ------------------------------------------------------------------ episode
    def reset(self, task: Task) -> Observation:
        self._generate(task.seed, task.task_type)
        self._task = task
        self._loc: str | None = None
        self._held: str | None = None
        self._open = {r: False for r in self._receptacles if kind(r) in OPENABLE}
        self._states: dict[str, set[str]] = {"heat": set(), "cool": set(), "clean": set()}
        self._lamp_on = False
        self._observed: set[str] = set()
        self._steps = 0
        self._done = False
        self._won = False
        self._refresh_admissible()
        return Observation(text=self._room_text(), goal=self._goal, admissible=list(self._admissible),
                           info={"task_type": self._task_type, "goal_object": self._goal_obj,
                                 "target": self._target, "max_steps": self.max_steps,
                                 "task_key": task.key})

    def _room_text(self) -> str:
        return ("You are in the middle of a room. Looking quickly around you, you see "
                f"{_listing(self._receptacles)}.")

    def _visible(self, r: str) -> bool:
        return self._open.get(r, True)

    def _describe(self, r: str) -> str:
        if r not in self._open:
            return f"On the {r}, you see {_listing(self._contents[r])}."
        if not self._open[r]:
            return f"The {r} is closed."
        return f"The {r} is open. In it, you see {_listing(self._contents[r])}."

    def _refresh_admissible(self) -> None:
        acts: dict[str, tuple] = {"look": ("look",), "inventory": ("inventory",)}
        loc, held = self._loc, self._held
        for r in self._receptacles:
            if r != loc:
                acts[f"go to {r}"] = ("go", r)
        if loc is not None:
            acts[f"examine {loc}"] = ("examine", loc)
            if loc in self._open:
                if self._open[loc]:
                    acts[f"close {loc}"] = ("close", loc)
                else:
                    acts[f"open {loc}"] = ("open", loc)
            if self._visible(loc):
                if held is None:
                    for o in self._contents[loc]:
                        if o != LAMP:
                            acts[f"take {o} from {loc}"] = ("take", o, loc)
                else:
                    acts[f"move {held} to {loc}"] = ("move", held, loc)
            if held is not None:
                for verb, app in APPLIANCE.values():
                    if loc == f"{app} 1":
                        acts[f"{verb} {held} with {loc}"] = (verb, held, loc)
            if loc == self._lamp_at:
                acts[f"use {LAMP}"] = ("use",)
        if held is not None:
            acts[f"examine {held}"] = ("examine", held)
        self._actions = acts
        self._admissible = sorted(acts, key=natural_key)

    def step(self, action: str) -> Transition:
        if self._task is None:
            raise RuntimeError("HouseholdEnv.step called before reset()")
        if self._done:
            raise RuntimeError("HouseholdEnv.step called after the episode ended; call reset() first")
        self._steps += 1
        parsed = self._actions.get(action.strip().lower()) if isinstance(action, str) else None
        if parsed is None:
            text, valid = NOTHING_HAPPENS, False
        else:
            text, valid = self._apply(parsed), True
            self._refresh_admissible()
            self._won = self._goal_met()
        self._done = self._won or self._steps >= self.max_steps
        return Transition(text=text, admissible=list(self._admissible), done=self._done, won=self._won,
                          score=1.0 if self._won else 0.0, valid=valid,
                          info={"task_type": self._task_type, "steps": self._steps})

    def _apply(self, parsed: tuple) -> str:
        verb = parsed[0]
        if verb == "go":
            r = parsed[1]
            self._loc = r
            if self._visible(r):
                self._observed.add(r)
            return f"You arrive at {r}. {self._describe(r)}"
        if verb == "open":
            r = parsed[1]
            self._open[r] = True
            self._observed.add(r)
            return f"You open the {r}. {self._describe(r)}"
        if verb == "close":
            self._open[parsed[1]] = False
            return f"You close the {parsed[1]}."
        if verb == "take":
            _, o, r = parsed
            self._contents[r].remove(o)
            self._held = o
            return f"You pick up the {o} from the {r}."
        if verb == "move":
            _, o, r = parsed
            self._contents[r].append(o)
            self._held = None
            return f"You move the {o} to the {r}."
        if verb in self._states:
            _, o, r = parsed
            self._states[verb].add(o)
            # Heating and cooling undo each other; cleanliness is independent.
            if verb == "heat":
                self._states["cool"].discard(o)
            elif verb == "cool":
                self._states["heat"].discard(o)
            return f"You {verb} the {o} using the {r}."
        if verb == "use":
            self._lamp_on = True
            return f"You turn on the {LAMP}."
        if verb == "examine":
            x = parsed[1]
            if x in self._contents:
                if self._visible(x):
                    self._observed.add(x)
                return self._describe(x)
            adjectives = [a for v, a in (("heat", "hot"), ("cool", "cold"), ("clean", "clean"))
                          if x in self._states[v]]
            if adjectives:
                return f"This is a {' and '.join(adjectives)} {x}."
            return f"There's nothing special about {x}."
        if verb == "inventory":
            return f"You are carrying: a {self._held}." if self._held else "You are not carrying anything."
        # look
        if self._loc is None:
            return self._room_text()
        return f"You are facing the {self._loc}. Next to it, you see nothing."

    def _goal_met(self) -> bool:
        g = self._goal_obj
        if self._task_type == LOOK:
            return (self._lamp_on and self._loc == self._lamp_at and self._held is not None
                    and kind(self._held) == g)
        need = APPLIANCE[self._task_type][0] if self._task_type in APPLIANCE else None
        want = 2 if self._task_type == PICK_TWO else 1
        for r in self._receptacles:
            if kind(r) != self._target:
                continue
            hits = sum(1 for o in self._contents[r]
                       if kind(o) == g and (need is None or o in self._states[need]))
            if hits >= want:
                return True
        return False

    def snapshot(self) -> dict:
        """A copy of the full hidden state, for tests and debugging (not for agents)."""
        return {
            "location": self._loc,
            "held": self._held,
            "contents": {r: tuple(sorted(c, key=natural_key)) for r, c in self._contents.items()},
            "open": dict(self._open),
            "hot": frozenset(self._states["heat"]),
            "cold": frozenset(self._states["cool"]),
            "clean": frozenset(self._states["clean"]),
            "lamp_at": self._lamp_at,
            "lamp_on": self._lamp_on,
            "steps": self._steps,
            "done": self._done,
            "won": self._won,
        }

    # ------------------------------------------------------------------ expert
    def expert_action(self) -> str:
        if self._task is None or self._done:
            raise RuntimeError("HouseholdEnv.expert_action needs a running episode (reset first)")
        held, tt = self._held, self._task_type
        if held is not None and kind(held) != self._goal_obj:
            return self._put_down(held)
        if held is None:
            return self._fetch()
        if tt == LOOK:
            if self._lamp_at in self._observed:
                return self._act_at(self._lamp_at, f"use {LAMP}")
            # Lamps stand on open surfaces, so only unseen surfaces can hide it.
            return self._explore(surfaces_only=True)
        if tt in APPLIANCE:
            verb, app = APPLIANCE[tt]
            if held not in self._states[verb]:
                return self._act_at(f"{app} 1", f"{verb} {held} with {app} 1")
        return self._place_at(self._destination(), held)

    def _act_at(self, r: str, action: str) -> str:
        return action if self._loc == r else f"go to {r}"

    def _reach(self, r: str, action: str) -> str:
        """`action` at r once there and r is open."""
        if self._loc != r:
            return f"go to {r}"
        return action if self._visible(r) else f"open {r}"

    def _place_at(self, r: str, o: str) -> str:
        return self._reach(r, f"move {o} to {r}")

    def _targets(self) -> list[str]:
        return [r for r in self._receptacles if kind(r) == self._target]

    def _count_goal(self, r: str) -> int:
        return sum(1 for o in self._contents[r] if kind(o) == self._goal_obj) if r in self._observed else 0

    def _pair_target(self) -> str:
        # No location preference here: that would make the expert shuttle between two half-filled targets.
        order = {r: i for i, r in enumerate(self._receptacles)}
        return min(self._targets(), key=lambda r: (-self._count_goal(r), not self._visible(r), order[r]))

    def _destination(self) -> str:
        if self._task_type == PICK_TWO:
            return self._pair_target()
        targets = self._targets()
        if self._loc in targets:
            return self._loc
        return next((r for r in targets if self._visible(r)), targets[0])

    def _fetch(self) -> str:
        skip = self._pair_target() if self._task_type == PICK_TWO else None
        for r in self._receptacles:
            if r in self._observed and r != skip:
                for o in sorted(self._contents[r], key=natural_key):
                    if kind(o) == self._goal_obj:
                        return self._reach(r, f"take {o} from {r}")
        return self._explore()

    def _explore(self, surfaces_only: bool = False) -> str:
        unseen = [r for r in self._receptacles if r not in self._observed
                  and not (surfaces_only and r in self._open)]
        if self._loc in unseen:
            return f"open {self._loc}"  # only a closed receptacle can be unseen while we stand at it
        if unseen:
            return f"go to {unseen[0]}"
        return "look"  # unreachable for generated rooms: every needed thing sits somewhere seen

    def _put_down(self, o: str) -> str:
        loc = self._loc
        if loc is not None:
            return self._place_at(loc, o)
        # From the middle of the room, drop it somewhere that also teaches us something.
        surfaces = [r for r in self._receptacles if r not in self._open]
        spot = next((r for r in surfaces if r not in self._observed), surfaces[0] if surfaces else self._receptacles[0])
        return f"go to {spot}"
