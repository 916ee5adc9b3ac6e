"""AlfWorldEnv: the real ALFWorld text games (TextWorld PDDL engine, no THOR) behind the Env protocol.

One game file (`json_2.1.1/<split>/<task>/<trial>/game.tw-pddl`) is played per episode with the same
TextWorld wrappers `AlfredTWEnv` uses (`AlfredDemangler`, `AlfredInfos`; no domain randomisation), so
observations and admissible commands are exactly what real ALFWorld shows.

Cost and memory. One TextWorld environment per `AlfWorldEnv` object, re-`load`ed on every `reset`
(a fresh `textworld.start` per game would map another 33 MB copy of fast-downward, which cannot be
unloaded); `close()` (or garbage collection) hands it to a per-process pool that the next
`AlfWorldEnv` takes it from, so a process holds one copy per env alive at once (one per agent
shard). TextWorld translates each game's PDDL four times per load+reset; the translation is cached
(`memo=True`; same observations, half the reset time). TextWorld also interns every logic object it
ever builds (~1 MB per distinct game); that cache is emptied past `MEMENTO_LIMIT` entries. On this
machine a reset takes ~0.5-10 s and a step ~0.05-1.5 s (large kitchens are the slow ones).

Data. `$ALFWORLD_DATA` (or the `data` argument) is the folder `alfworld-download` fills:
`json_2.1.1/{train, valid_seen, valid_unseen, valid_train}`. Games are filtered as `AlfredTWEnv`
does (both files present, no `movable`/`Sliced` trajectories, `solvable` true) and put in a fixed
order: by a hash of their relative path (default `order="hash"`, so any prefix or slice mixes the
six task types) or by path (`order="path"`). The protocol splits map onto ALFWorld's with `splits`
(default train -> train, calib -> valid_seen, test -> valid_unseen, the paper's out-of-distribution
test split of 134 games). A mapped value may be a Python slice of a split, e.g.
`{"calib": "valid_seen[:70]", "test": "valid_seen[70:]"}`, or a list of alternatives of which the
first one the data root has is used, e.g. `{"test": ["valid_unseen", "valid_seen[1::2]"]}`
(`resolved_splits` says which, and results record it); mapped splits that share a game are
refused. ALFWorld's own split names can also be passed to `tasks()` directly.

Episodes. `reset` returns the room description (the "-= Welcome ... =-" banner and the goal line
removed) as `text` and "Your task is to: ..." as `goal`; `admissible` is ALFWorld's list as is,
including `help` (real ALFWorld offers it; it prints the command list). `step` sends the action to
the game: a non-admissible one gets ALFWorld's own "Nothing happens." and `valid=False`. Following the
paper's ReAct protocol (App. B, C.2), an action starting with "think:" does not touch the game,
is answered "OK.", counts as a step and has `info["step_type"] = "think"`; every other step is
"action". An episode ends when won or after `max_steps` steps; `score` is 1.0 if won, else 0.0.

Expert (`expert_action`). Two experts, both of which label any reachable state (DAgger-style):
- "handcoded" (default): ALFWorld's own handcoded TextWorld expert (`HandCodedTWAgent`, from
  traj_data.json's `pddl_params`). It decides from what the agent has observed plus TextWorld's
  facts about the agent's hand, searching receptacles it has not seen, like the household expert. It
  is fed every executed admissible action. 0.4.2 ships it with a 0.3 leftover (it only notices a
  put-down in an action containing "put"; 0.4 says "move X to Y"), which is patched here. It is
  not guaranteed to win, so the planner below takes over for the rest of the episode when it
  raises, proposes a non-admissible action, or has used `handcoded_budget` steps without winning
  (it continues the walkthrough when the handcoded detour left it valid, else replans).
- "planner": the game's walkthrough, then fast-downward replanning from the current state whenever
  an executed action leaves the plan and changes the state (oracle: it knows hidden contents).
  Off-plan actions that only add `checked` facts (look, examine, inventory, help) keep the plan;
  an off-plan `go to` keeps it by going back first (or by dropping a `go to` it already did).
  A replan takes 0.01 s to ~20 s depending on the game, and on a few states fast-downward searches
  for many minutes: with `replan_timeout` > 0 (default 60 s of CPU time, so a busy machine does
  not change the data) each replan runs in a forked child that is killed at the limit, and the
  expert raises ExpertFailed (expert data skips the episode).
Both are seeded per task (the handcoded expert breaks ties with `random`), so labels are
reproducible. `expert_source` says which one produced the last label.

Thinking expert. With `expert_thinks=True` the expert's first label is the plan `think:` line of the
few-shot examples (`plan_thought`), then it acts as above: behaviour-cloned agents then think
first, as the paper's ReAct agents do, and their KL pools hold think steps for the action-only vs
all-step calibration.

Data. `ensure_data` (`python -m dmr.data`, the workflow's `data` rule) builds one root holding every
split the mapping uses: a split folder already there is kept, a missing one is linked from
$ALFWORLD_DATA, else from the shared copy (../shared/data/alfworld: valid_seen and valid_train
folders, train as train.tar.xz, unpacked), and each is checked against ALFWorld's game count
(GAMES). A split no source has is fetched with `alfworld-download` where github.com is reachable,
else the check fails naming the split and how to get it.

Versions. ALFWorld 0.3 and 0.4 differ in the action grammar (`put X in/on Y` vs `move X to Y`) and
text, so results are not comparable across them: the version is recorded (`alfworld_version`
attribute and `Observation.info`), and a version other than 0.4.x gives a warning. The grammar
itself comes with each game file (the shared data are 0.4 games).
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import random
import re
import select
import signal
import sys
import types
import warnings
from collections import OrderedDict
from functools import lru_cache
from pathlib import Path

from dmr.envs.base import ExpertFailed, Observation, Task, Transition

ALFWORLD_SPLITS = ("train", "valid_seen", "valid_unseen", "valid_train")
DEFAULT_SPLITS = {"train": "train", "calib": "valid_seen", "test": "valid_unseen"}
# ALFWorld's task folder prefix -> the task type names household.py uses.
TASK_TYPES = {
    "pick_and_place_simple": "pick_and_place",
    "pick_two_obj_and_place": "pick_two_obj_and_place",
    "look_at_obj_in_light": "look_at_obj_in_light",
    "pick_heat_then_place_in_recep": "pick_heat_then_place",
    "pick_cool_then_place_in_recep": "pick_cool_then_place",
    "pick_clean_then_place_in_recep": "pick_clean_then_place",
}
EXPERTS = ("handcoded", "planner")
THINK_PREFIX = "think:"
THINK_REPLY = "OK."
NOTHING_HAPPENS = "Nothing happens."
FEWSHOT_PATH = Path(__file__).resolve().parents[1] / "prompts" / "alfworld_fewshot.txt"
# Facts that no action's precondition or goal reads: adding them never invalidates a plan.
_INERT = frozenset({"checked"})
_LOCATION = frozenset({"atlocation", "not_atlocation"})
_SAS_CACHE: OrderedDict = OrderedDict()  # see _memo_pddl2sas
_POOL: list = []
# TextWorld interns every Variable/Signature/Proposition it ever builds in one process-wide dict
# (mementos._memento_cache, ~1 MB per distinct game). They compare by value, so the cache only saves
# allocations; it is emptied at a reset once it holds more than this many entries.
MEMENTO_LIMIT = 20_000  # TextWorld environments of closed AlfWorldEnvs, for reuse (see AlfWorldEnv.close)
_SLICE = re.compile(r"^(\w+)\[(-?\d*):(-?\d*)(?::(-?\d*))?\]$")

# Playable games per split (AlfredTWEnv's filter), as `alfworld-download` and the shared copy give them.
GAMES = {"train": 3553, "valid_seen": 140, "valid_unseen": 134, "valid_train": 200}
# The shared copy beside the project (../shared/data/alfworld): valid_seen and valid_train folders and
# train.tar.xz, read-only; ensure_data links or unpacks from it into a root of the project's own.
SHARED_DATA = Path(__file__).absolute().parents[2].parent / "shared" / "data" / "alfworld"
UNPACKED = ".dmr-unpacked"  # marks a split folder ensure_data unpacked (redone if found incomplete)

HOW_TO_GET_DATA = (
    "ALFWorld's game files are needed: run `alfworld-download` (needs internet; it fills "
    "$ALFWORLD_DATA, default ~/.cache/alfworld) and point ALFWORLD_DATA (or the env's `data` "
    "argument) at it, or build a root from the shared copy with `python -m dmr.data` (the workflow's "
    "`data` rule; it has valid_seen, valid_train and train, not valid_unseen).")


@lru_cache(maxsize=None)
def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def alfworld_version() -> str | None:
    return _version("alfworld")


def versions() -> dict:
    """The game stack's versions, recorded with every result (0.3 and 0.4 games differ in grammar)."""
    return {name: _version(name) for name in ("alfworld", "textworld")}


def data_root(data: str | os.PathLike | None = None) -> Path:
    """The root the games are read from: `data`, else $ALFWORLD_DATA, else alfworld's default
    (~/.cache/alfworld). It need not exist yet."""
    raw = data if data is not None else os.environ.get("ALFWORLD_DATA") or "~/.cache/alfworld"
    return Path(os.path.expandvars(os.path.expanduser(str(raw)))).resolve()


def _online(host: str = "github.com", timeout: float = 5.0) -> bool:
    import socket

    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _games_dir(root: Path) -> Path:
    """A root's split folders: `root/json_2.1.1`, or `root` itself when it is given as json_2.1.1."""
    return root if root.name == "json_2.1.1" else root / "json_2.1.1"


def _sources() -> list[Path]:
    """Where a missing split is provided from, in order: $ALFWORLD_DATA, then the shared copy."""
    env = os.environ.get("ALFWORLD_DATA")
    out = [Path(os.path.expandvars(os.path.expanduser(env)))] if env else []
    return out + [SHARED_DATA]


def alternatives(spec) -> list[str]:
    """The ALFWorld splits a mapped value names, in order of preference: a split ('valid_seen'), a
    slice of one ('valid_seen[:70]') or a list of them (the first one the data has is used)."""
    specs = [spec] if isinstance(spec, str) else list(spec) if isinstance(spec, (list, tuple)) else [spec]
    if not specs:
        raise ValueError("an ALFWorld split mapping value must name at least one split")
    for s in specs:
        AlfWorldEnv._parse_split(s)  # a malformed value fails here, naming itself
    return specs


def count_games(folder: str | os.PathLike) -> int:
    """Playable games of a split folder (filtered as AlfredTWEnv does)."""
    return len(_index(str(Path(folder).resolve()), "path"))


def _check_count(folder: Path, split: str, origin: str) -> None:
    n, want = count_games(folder), GAMES.get(split)
    if want is not None and n != want:
        raise SystemExit(
            f"ALFWorld split {split!r} at {folder} ({origin}) has {n} playable games, not {want}: a partial "
            f"download or unpack, or another ALFWorld release. Remove it and run `alfworld-download` again "
            f"(or let `python -m dmr.data` unpack the shared archive).")


def _unpack(archive: Path, target: Path, split: str) -> None:
    """Unpack `archive` (json_2.1.1/<split>/... inside) into `target` = <games dir>/<split>, atomically:
    into a temporary folder beside it, then one rename, so an interrupted unpack leaves no split."""
    import shutil
    import tarfile
    import tempfile

    print(f"unpacking ALFWorld {split} from {archive} into {target}", flush=True)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".unpack-{split}-", dir=target.parent))
    except OSError as e:
        raise SystemExit(f"cannot unpack ALFWorld {split} into {target.parent}: {e}. Point "
                         "`benchmarks.<name>.env_kwargs.data` at a writable folder (the configs use data/alfworld).")
    try:
        with tarfile.open(archive) as tf:
            tf.extractall(tmp, filter="data")
        inner = next((p for p in (tmp / "json_2.1.1" / split, tmp / split) if p.is_dir()), None)
        if inner is None:
            raise SystemExit(f"{archive} holds no json_2.1.1/{split} folder")
        (inner / UNPACKED).write_text(f"{archive}\n")
        try:
            inner.rename(target)
        except OSError:
            if not target.is_dir():  # not a concurrent unpack that got there first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _provide(games: Path, split: str, sources: list[Path]) -> str | None:
    """Make `games/<split>` a complete split folder: present (counted), else a link to a source's
    folder, else unpacked from a source's `<split>.tar.xz`. Returns where it came from, None when
    no source has it."""
    import shutil

    target = games / split
    if target.is_dir():
        origin = f"link to {target.resolve()}" if target.is_symlink() else "present"
        if (target / UNPACKED).is_file() and split in GAMES and count_games(target) != GAMES[split]:
            shutil.rmtree(target)  # ours, and incomplete: unpack it again below
            _index.cache_clear()
        else:
            _check_count(target, split, origin)
            return origin
    for src in sources:
        folder = _games_dir(src.resolve()) / split
        if folder.is_dir() and folder.resolve() != target.resolve():
            _check_count(folder, split, f"from {src}")
            try:
                if target.is_symlink():
                    target.unlink()  # a link to a folder that is gone
                target.parent.mkdir(parents=True, exist_ok=True)
                target.symlink_to(folder.resolve(), target_is_directory=True)
            except OSError as e:
                raise SystemExit(f"cannot link ALFWorld {split} into {games}: {e}. Point "
                                 "`benchmarks.<name>.env_kwargs.data` at a writable folder.")
            return f"link to {folder.resolve()}"
        archive = src / f"{split}.tar.xz"
        if archive.is_file():
            _unpack(archive, target, split)
            _index.cache_clear()
            _check_count(target, split, f"unpacked from {archive}")
            return f"unpacked from {archive.resolve()}"
    return None


def ensure_data(data: str | os.PathLike | None = None, splits: dict | None = None, fetch: bool = True,
                keys=None, sources: list | None = None) -> Path:
    """Build one root that holds every ALFWorld split the mapping `splits` (default DEFAULT_SPLITS)
    uses, or only those of the protocol splits `keys` (ALFWorld split names are taken as they are).

    Each split folder is taken from the root when it is there, else linked from $ALFWORLD_DATA, else
    from the shared copy (linked, or unpacked from its `<split>.tar.xz`), and its playable games are
    counted against ALFWorld's (GAMES). A mapped value that lists alternatives uses the first one
    some source has. Only when a split is nowhere: fetched with `alfworld-download` where github.com
    is reachable and `fetch` is on, else SystemExit naming the missing splits and how to get them.
    Idempotent: a second call finds everything in place. Returns the root."""
    import subprocess

    root = data_root(data)
    games = _games_dir(root)
    mapping = dict(DEFAULT_SPLITS if splits is None else splits)
    keys = list(mapping) if keys is None else list(keys)
    wanted = {}
    for k in keys:
        if k not in mapping and AlfWorldEnv._parse_split(k)[0] != k:
            raise ValueError(f"unknown split {k!r}; mapped: {sorted(mapping)}")
        wanted[k] = [AlfWorldEnv._parse_split(s)[0] for s in alternatives(mapping.get(k, k))]
    sources = _sources() if sources is None else [Path(s) for s in sources]

    def provide_all(srcs):
        return {k: names for k, names in wanted.items() if not any(_provide(games, n, srcs) for n in names)}

    missing = provide_all(sources)
    if missing and fetch and _online():
        target = data_root(None)  # alfworld-download's own folder, linked from there
        print(f"fetching ALFWorld game files into {target} (alfworld-download)", flush=True)
        subprocess.run(["alfworld-download", "--data-dir", str(target)], check=True)
        missing = provide_all([target, *sources])
        if missing:
            raise SystemExit(f"alfworld-download finished but {_games_dir(target)} lacks {missing}")
    if missing:
        names = sorted({n for ns in missing.values() for n in ns})
        why = "fetching is off" if not fetch else ("github.com is not reachable, so alfworld-download cannot "
                                                   "fetch them")
        raise SystemExit(
            f"ALFWorld game files are missing: {games}/{{{','.join(names)}}} (split "
            + ", ".join(f"{k} -> {'|'.join(ns)}" for k, ns in missing.items())
            + f"), no source has them (looked in: root, {', '.join(map(str, sources))}), and {why}. "
            "Provide them: run `alfworld-download --data-dir DIR` (valid_unseen, the paper's test split, "
            "comes only from there) on a machine with internet, copy DIR here, then point ALFWORLD_DATA at "
            "it (or set `benchmarks.<name>.env_kwargs.data`; relative paths are relative to the repository). "
            f"The shared copy {SHARED_DATA} has valid_seen, valid_train and train ({SHARED_DATA}/train.tar.xz).")
    return root


def split_origins(root: str | os.PathLike) -> dict[str, str]:
    """Where each split folder of a root comes from: the archive it was unpacked from, or the folder
    (a link's target)."""
    games, out = _games_dir(Path(root)), {}
    for s in ALFWORLD_SPLITS:
        if (games / s).is_dir():
            marker = games / s / UNPACKED
            out[s] = f"unpacked from {marker.read_text().strip()}" if marker.is_file() else str((games / s).resolve())
    return out


def fewshot(path: str | Path = FEWSHOT_PATH) -> str:
    """The ReAct few-shot prefix (two expert episodes on valid_train games), for React(prefix=...)."""
    return Path(path).read_text()


def task_type_of(game: str | Path) -> str:
    """'.../pick_and_place_simple-Book-None-Sofa-229/trial_x/game.tw-pddl' -> 'pick_and_place'."""
    folder = Path(game).parent.parent.name
    prefix = folder.split("-", 1)[0]
    if prefix not in TASK_TYPES:
        raise ValueError(f"unknown ALFWorld task folder {folder!r}; expected a prefix in {sorted(TASK_TYPES)}")
    return TASK_TYPES[prefix]


def _resolve_root(data: str | os.PathLike | None) -> Path:
    raw = data if data is not None else os.environ.get("ALFWORLD_DATA")
    if not raw:
        raise FileNotFoundError(f"No ALFWorld data folder: pass data=... or set ALFWORLD_DATA. {HOW_TO_GET_DATA}")
    root = Path(os.path.expandvars(os.path.expanduser(str(raw)))).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"ALFWorld data folder {str(root)!r} does not exist. {HOW_TO_GET_DATA}")
    # Accept $ALFWORLD_DATA itself or its json_2.1.1 folder.
    return root / "json_2.1.1" if (root / "json_2.1.1").is_dir() else root


@lru_cache(maxsize=None)
def _index(split_dir: str, order: str) -> tuple[str, ...]:
    """Playable games of one split folder, filtered as AlfredTWEnv does, in a fixed order."""
    games = []
    for traj in Path(split_dir).glob("*/*/traj_data.json"):
        game = traj.parent / "game.tw-pddl"
        rel = str(game.relative_to(split_dir))
        if "movable" in rel or "Sliced" in rel or not game.is_file():
            continue
        if traj.parent.parent.name.split("-", 1)[0] not in TASK_TYPES:
            continue
        with game.open() as f:
            if not json.load(f).get("solvable", False):
                continue
        games.append(rel)
    if order == "path":
        games.sort()
    else:
        games.sort(key=lambda r: (hashlib.sha256(r.encode()).hexdigest(), r))
    return tuple(str(Path(split_dir) / r) for r in games)


@contextlib.contextmanager
def _keep_globals():
    """Undo two process-wide side effects of the game stack: fast_downward's pddl2sas overwrites
    sys.argv on every game load, and importing alfworld sets ALFWORLD_DATA (to ~/.cache/alfworld)."""
    argv, data = list(sys.argv), os.environ.get("ALFWORLD_DATA")
    try:
        yield
    finally:
        sys.argv[:] = argv
        if data is None:
            os.environ.pop("ALFWORLD_DATA", None)
        else:
            os.environ["ALFWORLD_DATA"] = data


@contextlib.contextmanager
def _seeded(module, rng: random.Random):
    """Run `module`'s calls to the global `random` functions on `rng` instead."""
    saved = module.random
    module.random = rng
    try:
        yield
    finally:
        module.random = saved


def _trim_memento_cache() -> None:
    try:
        from mementos.core import _memento_cache
    except ImportError:  # another TextWorld version: nothing to trim
        return
    if len(_memento_cache) > MEMENTO_LIMIT:
        _memento_cache.clear()


def sas_cache_dir() -> Path | None:
    """Where fast-downward translations persist across processes: $DMR_SAS_CACHE (empty or `0`: off),
    else $XDG_CACHE_HOME/dmr/alfworld-sas (~/.cache by default)."""
    env = os.environ.get("DMR_SAS_CACHE")
    if env is not None:
        return Path(env) if env not in ("", "0") else None
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dmr" / "alfworld-sas"


def _translate(original, domain: str, problem: str, verbose: bool, optimize: bool):
    """One translation, (parsed task, SAS text), read from the on-disk cache when a process translated
    the same (domain, problem, optimize) with the same fast-downward before: every rollout of a split
    loads its games again. Written atomically; a cache that cannot be read or written only costs the
    translation. Entries are pickles of fast-downward's own objects, in the user's cache folder."""
    import pickle

    folder = sas_cache_dir()
    if folder is None:
        return original(domain, problem, verbose=verbose, optimize=optimize)
    version = _version("fast_downward_textworld") or "unknown"
    key = hashlib.sha256(f"{version}\0{bool(optimize)}\0{domain}\0{problem}".encode()).hexdigest()
    path = folder / key[:2] / f"{key}.pkl"
    try:
        with path.open("rb") as f:
            return pickle.load(f)
    except (OSError, EOFError, pickle.UnpicklingError):
        pass
    out = original(domain, problem, verbose=verbose, optimize=optimize)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(pickle.dumps(out, protocol=pickle.HIGHEST_PROTOCOL))
        os.replace(tmp, path)
    except OSError as e:
        warnings.warn(f"fast-downward translation cache {folder} not writable ({e}); translating each time",
                      RuntimeWarning, stacklevel=2)
    return out


@contextlib.contextmanager
def _memo_pddl2sas():
    """Translate each game's PDDL once, not four times: TextWorld's PddlEnv builds its state (two
    fast-downward translations) in `load` and again in `reset`; the translation is a pure function
    of (domain, problem, optimize), so a small cache returns the same result for the second time,
    and an on-disk one (sas_cache_dir) to the next process that loads the game."""
    import fast_downward

    original = fast_downward.pddl2sas

    def memo(domain, problem, verbose=False, optimize=False):
        key = (hashlib.sha256(f"{domain}\0{problem}".encode()).hexdigest(), bool(optimize))
        if key in _SAS_CACHE:
            _SAS_CACHE.move_to_end(key)
        else:
            _SAS_CACHE[key] = _translate(original, domain, problem, verbose, optimize)
            while len(_SAS_CACHE) > 8:
                _SAS_CACHE.popitem(last=False)
        return _SAS_CACHE[key]

    fast_downward.pddl2sas = memo
    try:
        yield
    finally:
        fast_downward.pddl2sas = original


def _track_move(self, game_state, last_action):
    """BasePolicy.update_state_tracking, taught ALFWorld 0.4's `move X to Y` put-down."""
    from alfworld.agents.expert.handcoded_expert import BasePolicy

    BasePolicy.update_state_tracking(self, game_state, last_action)
    if (last_action.startswith("move ") and "put" not in last_action and self.inventory
            and "Nothing happens" not in game_state["feedback"]):
        obj = self.inventory.pop()
        self.got_inventory_from_recep = ""
        self.blacklist_obj(obj)
        if self.task_params["object_target"] in last_action:
            self.object_blacklist.append(obj)


def in_child(fn, cpu_seconds: float, wall_factor: float = 20.0):
    """Run `fn()` in a forked copy of this process and return its JSON-able result, or None when
    the child used more than `cpu_seconds` of CPU time (it is killed then).

    The limit is CPU time (the child's ITIMER_PROF, whose default action ends it), not wall time,
    so a busy machine cannot change which replans succeed and hence the expert's data. A wall-time
    net (`wall_factor` times the limit, at least a minute) only catches a child that waits without
    computing; it warns when it fires. A child that dies otherwise raises ChildProcessError."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: compute, send, leave without running any cleanup of the parent's
        try:
            os.close(read)
            signal.signal(signal.SIGPROF, signal.SIG_DFL)
            signal.setitimer(signal.ITIMER_PROF, max(cpu_seconds, 1e-6))
            result = fn()
            signal.setitimer(signal.ITIMER_PROF, 0)
            with os.fdopen(write, "w") as f:
                json.dump(result, f)
        finally:
            os._exit(0)
    os.close(write)
    wall = max(60.0, wall_factor * cpu_seconds)
    with os.fdopen(read) as f:
        ready, _, _ = select.select([f], [], [], wall)
        if not ready:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            warnings.warn(f"a forked child used under {cpu_seconds:g} s of CPU time but ran past its "
                          f"wall-time net ({wall:g} s) and was killed", RuntimeWarning, stacklevel=2)
            return None
        text = f.read()
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGPROF:
        return None
    if not text:
        raise ChildProcessError(f"the forked child died without a result (wait status {status})")
    return json.loads(text)


class AlfWorldEnv:
    """Real ALFWorld (TextWorld) games, one episode at a time (see module doc)."""

    name = "alfworld"

    def __init__(self, data: str | None = None, max_steps: int = 50, splits: dict | None = None,
                 expert: str | None = "handcoded", handcoded_budget: int = 30, order: str = "hash",
                 task_types=None, memo: bool = True, expert_thinks: bool = False, replan_timeout: float = 60.0):
        if max_steps < 1:
            raise ValueError("max_steps must be >= 1")
        if expert not in EXPERTS + (None,):
            raise ValueError(f"expert must be one of {EXPERTS} or None, got {expert!r}")
        if order not in ("hash", "path"):
            raise ValueError(f"order must be 'hash' or 'path', got {order!r}")
        self.max_steps = max_steps
        self.expert = expert
        self.handcoded_budget = handcoded_budget
        self.replan_timeout = replan_timeout
        # The expert's first label is the plan `think:` step of the few-shot examples, so agents
        # cloned from it think too (and their KL pools hold think steps for the AO/AS ablation).
        self.expert_thinks = expert_thinks
        self.order = order
        # Cache fast-downward translations in memory and on disk (see _memo_pddl2sas); False: TextWorld as is.
        self.memo = memo
        self.task_types = None if task_types is None else tuple(task_types)
        if self.task_types is not None:
            unknown = [t for t in self.task_types if t not in TASK_TYPES.values()]
            if unknown or not self.task_types:
                raise ValueError(f"task_types must be a non-empty subset of {sorted(TASK_TYPES.values())}, "
                                 f"got {task_types!r}")
        self.splits = dict(DEFAULT_SPLITS if splits is None else splits)
        for v in self.splits.values():
            alternatives(v)  # fail early on a malformed mapping
        self.root = _resolve_root(data)
        self.alfworld_version = alfworld_version()
        self.versions = versions()
        if self.alfworld_version is None:
            raise ImportError("AlfWorldEnv needs the `alfworld` package (text-only): pip install alfworld==0.4.2")
        if not self.alfworld_version.startswith("0.4."):
            warnings.warn(f"alfworld {self.alfworld_version} is installed; this adapter targets 0.4.x "
                          "(0.3 uses `put X in/on Y`, 0.4 `move X to Y`), results record the version",
                          RuntimeWarning, stacklevel=2)
        self._check_disjoint()
        self._tw = None          # the TextWorld environment, reused across resets
        self._task: Task | None = None
        self._done = True
        self.expert_source: str | None = None

    # ------------------------------------------------------------------ splits and tasks
    @staticmethod
    def _parse_split(spec: str) -> tuple[str, slice]:
        m = _SLICE.match(spec.strip()) if isinstance(spec, str) else None
        name, sl = (m.group(1), slice(*(int(g) if g else None for g in m.group(2, 3, 4)))) if m else (spec, slice(None))
        if name not in ALFWORLD_SPLITS:
            raise ValueError(f"unknown ALFWorld split {spec!r}; expected one of {ALFWORLD_SPLITS}, "
                             "optionally sliced, e.g. 'valid_seen[:70]'")
        return name, sl

    def mapped(self, split: str) -> str:
        """The mapped value a protocol split resolves to: of a list of alternatives, the first whose
        folder the data root has (the first when none has one, so its absence is what is reported)."""
        specs = alternatives(self.splits[split])
        return next((s for s in specs if (self.root / self._parse_split(s)[0]).is_dir()), specs[0])

    @property
    def resolved_splits(self) -> dict[str, str]:
        """Each protocol split's resolved mapping, e.g. {"test": "valid_unseen", ...}: recorded with
        results, since a mapping with alternatives depends on the data."""
        return {k: self.mapped(k) for k in self.splits}

    def resolve(self, split: str) -> tuple[str, slice]:
        """The ALFWorld split (and slice of it) that a protocol or ALFWorld split name refers to."""
        if split in self.splits:
            return self._parse_split(self.mapped(split))
        if split in ALFWORLD_SPLITS:
            return split, slice(None)
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(self.splits)} "
                         f"(mapped as {self.splits}) or an ALFWorld split {ALFWORLD_SPLITS}")

    def games(self, split: str) -> list[str]:
        """Game files of `split`, in task-index order."""
        name, sl = self.resolve(split)
        folder = self.root / name
        if not folder.is_dir():
            spec = "|".join(alternatives(self.splits[split])) if split in self.splits else split
            raise FileNotFoundError(f"ALFWorld split folder {str(folder)!r} is missing (split {split!r} -> "
                                    f"{spec}). {HOW_TO_GET_DATA} Or map the protocol splits onto the splits "
                                    "the data has with `splits=`.")
        games = list(_index(str(folder), self.order))
        if self.task_types is not None:
            games = [g for g in games if task_type_of(g) in self.task_types]
        return games[sl]

    def _check_disjoint(self) -> None:
        seen: dict[str, str] = {}
        for split in self.splits:
            name, _ = self.resolve(split)
            if not (self.root / name).is_dir():
                continue  # reported when the split is used
            for g in self.games(split):
                if g in seen and seen[g] != split:
                    raise ValueError(f"splits {seen[g]!r} and {split!r} share games (e.g. {g}); "
                                     f"mapping {self.splits} must give disjoint game sets")
                seen[g] = split

    def split_size(self, split: str) -> int:
        """Number of games of `split`: a fixed split, unlike the generated household pools."""
        return len(self.games(split))

    def tasks(self, split: str, n: int | None = None, offset: int = 0) -> list[Task]:
        """Tasks `offset .. offset + n - 1` of `split` (all remaining ones when n is None)."""
        games = self.games(split)
        n = len(games) - offset if n is None else n
        if n < 0 or offset < 0 or offset + n > len(games):
            raise ValueError(f"split {split!r} ({self.resolve(split)[0]}) has {len(games)} games; "
                             f"asked for {n} from offset {offset}")
        return [Task(benchmark=self.name, split=split, index=i, seed=i, task_type=task_type_of(games[i]))
                for i in range(offset, offset + n)]

    # ------------------------------------------------------------------ episode
    def _start(self, game: str):
        _trim_memento_cache()
        with _keep_globals(), _memo_pddl2sas() if self.memo else contextlib.nullcontext():
            if self._tw is None and _POOL:
                self._tw = _POOL.pop()
            if self._tw is None:
                import textworld
                from alfworld.agents.environment.alfred_tw_env import AlfredDemangler, AlfredInfos

                infos = textworld.EnvInfos(won=True, admissible_commands=True, facts=True,
                                           extras=["gamefile", "walkthrough"])
                self._tw = textworld.start(game, request_infos=infos,
                                           wrappers=[AlfredDemangler(shuffle=False), AlfredInfos])
            else:
                self._tw.load(game)
            return self._tw.reset()

    def reset(self, task: Task) -> Observation:
        if task.benchmark != self.name:
            raise ValueError(f"task {task.key} is not an {self.name} task")
        games = self.games(task.split)
        if not 0 <= task.index < len(games):
            raise ValueError(f"task {task.key}: split {task.split!r} has {len(games)} games")
        game = games[task.index]
        state = self._start(game)
        self._task, self._game, self._state = task, game, state
        self._task_type = task_type_of(game)
        self._admissible = list(state["admissible_commands"])
        self._steps, self._done, self._won = 0, False, bool(state["won"])
        self._at: str | None = None  # the receptacle the agent last went to
        paragraphs = [p.strip() for p in state["feedback"].split("\n\n") if p.strip()]
        goals = [p for p in paragraphs if p.startswith("Your task is to:")]
        if len(goals) != 1:
            raise RuntimeError(f"{game}: no single 'Your task is to:' line in {state['feedback']!r}")
        self._goal = goals[0]
        text = "\n\n".join(p for p in paragraphs if p != goals[0] and not p.startswith("-= Welcome"))
        self._reset_expert(task)
        return Observation(text=text, goal=self._goal, admissible=list(self._admissible),
                           info={"game": game, "alfworld_version": self.alfworld_version,
                                 "alfworld_split": self.resolve(task.split)[0], "task_type": self._task_type,
                                 "max_steps": self.max_steps, "task_key": task.key})

    def step(self, action: str) -> Transition:
        if self._task is None:
            raise RuntimeError("AlfWorldEnv.step called before reset()")
        if self._done:
            raise RuntimeError("AlfWorldEnv.step called after the episode ended; call reset() first")
        self._steps += 1
        command = action.strip() if isinstance(action, str) else ""
        if command.lower().startswith(THINK_PREFIX):
            text, valid, step_type = THINK_REPLY, True, "think"
        else:
            step_type = "action"
            valid = command in self._admissible
            before = self._state
            self._state, _, _ = self._tw.step(command)
            text = self._state["feedback"]
            self._admissible = list(self._state["admissible_commands"])
            self._won = bool(self._state["won"])
            if valid:
                self._observe_expert(command, before, self._state)
                if command.startswith("go to "):
                    self._at = command[len("go to "):]
        self._done = self._won or self._steps >= self.max_steps
        return Transition(text=text, admissible=list(self._admissible), done=self._done, won=self._won,
                          score=1.0 if self._won else 0.0, valid=valid,
                          info={"step_type": step_type, "task_type": self._task_type, "steps": self._steps})

    def close(self) -> None:
        """End the episode and hand this env's TextWorld game back to a per-process pool.

        Each TextWorld PDDL environment holds its own copy of fast-downward's library, which
        cannot be unloaded (dlclose leaves it mapped), so closed or garbage-collected envs lend
        theirs to the next AlfWorldEnv of the process instead of leaking it; a closed env can be
        reset again. The process holds as many copies as envs were ever alive at once."""
        tw, self._tw = self._tw, None
        self._task, self._done = None, True
        if tw is not None:
            _POOL.append(tw)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    # ------------------------------------------------------------------ expert
    def _reset_expert(self, task: Task) -> None:
        self._plan: list[str] | None = list(self._state.get("extra.walkthrough") or []) or None
        self._plan_source = "walkthrough"
        self._hc = None
        self._hc_next: str | None = None
        self._label: str | None = None
        self.expert_source = None
        if self.expert != "handcoded":
            return
        with _keep_globals():
            from alfworld.agents.expert import HandCodedTWAgent

        self._hc_rng = random.Random(f"{task.key}/{task.seed}")
        self._hc = HandCodedTWAgent(max_steps=10 * self.max_steps)
        self._hc.reset(self._game)
        self._hc.policy.update_state_tracking = types.MethodType(_track_move, self._hc.policy)
        self._feed_handcoded("")

    def _feed_handcoded(self, last_action: str) -> None:
        from alfworld.agents.expert import handcoded_expert

        if self._hc is None or self._won:
            return
        try:
            with _seeded(handcoded_expert, self._hc_rng):
                nxt = self._hc.act(self._state, 0, self._state["won"], last_action)
        except Exception:  # HandCodedAgentFailed / Timeout, or a heuristic tripping over a state
            nxt = None
        if nxt not in self._admissible:
            self._hc = None  # failed: the planner finishes the episode
        self._hc_next = nxt

    def _observe_expert(self, command: str, before, after) -> None:
        self._label = None
        if self.expert is None:
            return
        self._follow(command, before, after)
        if self._hc is not None:
            self._feed_handcoded(command)

    def _follow(self, command: str, before, after) -> None:
        """Keep the plan valid after `command`: advance on it, repair a harmless detour, else drop it."""
        plan = self._plan
        if not plan:
            return
        if command == plan[0]:
            plan.pop(0)
            return
        gone, new = set(before["_facts"]) - set(after["_facts"]), set(after["_facts"]) - set(before["_facts"])
        names = {f.name.lower() for f in gone | new}
        if names <= _INERT:
            return
        if names <= _INERT | _LOCATION and command.startswith("go to "):
            target = command[len("go to "):]
            if plan[0].startswith("go to "):
                if plan[0] == f"go to {target}":
                    plan.pop(0)
                return
            if self._at is not None:
                plan.insert(0, f"go to {self._at}")
                return
        self._plan = None

    def _replan(self) -> list[str]:
        pddl = self._tw.unwrapped
        if self.replan_timeout <= 0:
            return list(pddl._pddl_state.replan(pddl._entity_infos))
        # fast-downward's search is one C call that Python cannot interrupt: run it in a forked
        # copy of this process (its planner state included) with a CPU-time limit.
        try:
            plan = in_child(lambda: list(pddl._pddl_state.replan(pddl._entity_infos)), self.replan_timeout)
        except ChildProcessError as e:
            raise ExpertFailed(f"{self._game}: the planner's {e}") from None
        if plan is None:
            raise ExpertFailed(f"{self._game}: the planner found no plan within replan_timeout "
                               f"({self.replan_timeout:g} s of CPU time)")
        return plan

    def expert_action(self) -> str:
        if self._task is None or self._done:
            raise RuntimeError("AlfWorldEnv.expert_action needs a running episode (reset first)")
        if self.expert is None:
            raise RuntimeError("this AlfWorldEnv was made with expert=None")
        if self._label is not None:
            return self._label
        if self.expert_thinks and self._steps == 0:
            self.expert_source = "plan"
            return plan_thought(self._game)
        if self._hc is not None and self._steps < self.handcoded_budget:
            self._label, self.expert_source = self._hc_next, "handcoded"
            return self._label
        self._hc = None
        if not (self._plan and self._plan[0] in self._admissible):
            self._plan, self._plan_source = self._replan(), "planner"
            if not self._plan or self._plan[0] not in self._admissible:
                raise ExpertFailed(f"{self._game}: the planner found no plan from the current state")
        self._label, self.expert_source = self._plan[0], self._plan_source
        return self._label


# ---------------------------------------------------------------------- ReAct few-shot prefix
FEWSHOT_HEADER = "Interact with a household to solve a task. Here are two examples.\n"
FEWSHOT_FOOTER = "\nHere is the task.\n"
# (split, game folder relative to the split) of the two examples in alfworld_fewshot.txt
FEWSHOT_GAMES = (
    ("valid_train", "pick_and_place_simple-Pillow-None-ArmChair-321/trial_T20190908_104900_888704"),
    ("valid_train", "pick_clean_then_place_in_recep-SoapBar-None-GarbageCan-429/trial_T20190909_015556_293557"),
)
_APPLIANCE = {"pick_heat_then_place": ("heat", "microwave"), "pick_cool_then_place": ("cool", "fridge"),
              "pick_clean_then_place": ("clean", "sinkbasin")}


def plan_thought(game: str | Path) -> str:
    """A ReAct-style `think:` line stating the plan, from traj_data.json's pddl_params."""
    with (Path(game).parent / "traj_data.json").open() as f:
        params = json.load(f)["pddl_params"]
    obj, recep, toggle = (params[k].lower() for k in ("object_target", "parent_target", "toggle_target"))
    tt = task_type_of(game)
    if tt == "look_at_obj_in_light":
        steps = f"find and take a {obj}, then find and use a {toggle}"
    elif tt == "pick_two_obj_and_place":
        steps = (f"find and take the first {obj}, then put it in/on {recep}, then find and take the "
                 f"second {obj}, then put it in/on {recep}")
    elif tt in _APPLIANCE:
        verb, appliance = _APPLIANCE[tt]
        steps = f"find and take a {obj}, then {verb} it with {appliance}, then put it in/on {recep}"
    else:
        steps = f"find and take a {obj}, then put it in/on {recep}"
    return f"think: To solve the task, I need to {steps}."


def react_example(env: AlfWorldEnv, task: Task) -> str:
    """One solved episode in the React prompt format: goal, first observation, then `> action` /
    observation lines; a plan `think:` step first, then the expert (walkthrough) to the win."""
    first = env.reset(task)
    lines = [first.goal.strip(), first.text.strip()]
    action = plan_thought(env._game)
    while True:
        tr = env.step(action)
        lines += [f"> {action}", tr.text.strip()]
        if tr.done:
            break
        action = env.expert_action()
    if not tr.won:
        raise RuntimeError(f"{task.key}: the expert did not win this example")
    return "\n".join(lines) + "\n"


def make_fewshot(data: str | None = None, games=FEWSHOT_GAMES) -> str:
    """The few-shot prefix stored in dmr/prompts/alfworld_fewshot.txt, rebuilt from the games."""
    env = AlfWorldEnv(data=data, splits={}, expert="planner", order="path")
    try:
        blocks = []
        for split, folder in games:
            paths = env.games(split)
            index = next(i for i, g in enumerate(paths) if Path(g).parent == env.root / split / folder)
            blocks.append(react_example(env, env.tasks(split, 1, index)[0]))
    finally:
        env.close()
    return FEWSHOT_HEADER + "\n".join(blocks) + FEWSHOT_FOOTER
