"""WebShopEnv: the real WebShop benchmark (Yao et al., 2022) through its text environment,
`web_agent_site.envs.web_agent_text_env.WebAgentTextEnv`, in the same protocol as dmr.envs.shop.

WebShop is not on PyPI (the `webshop` package there is an empty stub). Install it from its
repository (https://github.com/princeton-nlp/WebShop: `setup.sh -d all` downloads its product data,
spaCy's en_core_web_lg and builds the pyserini search index, which needs Java 11+) and put its
checkout on PYTHONPATH, so that `import web_agent_site` works. Its reward loads spaCy's
en_core_web_sm, which setup.sh does not fetch: `python -m spacy download en_core_web_sm` too. The
embedded shop's catalogue can be served by the same code: `dmr.envs.shop.write_webshop_files`
writes WebShop's data files and `write_search_documents` the documents its indexing script reads
(tests/test_webshop.py says how to run the tests that way).

Protocol (paper App. B, C.1): goals are WebShop's human instructions in its fixed shuffled order;
the first 500 are the test split (as in WebShop's and verl-agent's evaluations), the next 1000
calib and the rest train. Observations are WebShop's simple text mode without the instruction
(the prompt carries it); admissible actions are `search[<your query>]` on the page with the search
bar and `click[...]` for each clickable. A search is only accepted on that page (WebShop itself
would accept one anywhere), so every step is a `search` or a `click` step by the page it is taken
on, and `info["next_step_type"]` announces the upcoming one. The score is WebShop's reward;
success is score 1; episodes stop after `max_steps` with score 0.

Two departures from running WebAgentTextEnv as is. WebShop draws each human goal's price bound
(part of the instruction and of the reward), and the price of a product listed with a price range,
from Python's unseeded global `random`, so its goals differ from process to process; the adapter
seeds it with GOAL_SEED while the server loads (and restores the caller's random state), so a task
is the same episode in every process. And the envs of a process share one server, whose session
state is keyed by session id: each env gets its own session prefix, so envs playing the same task at
once (GRPO's groups, dmr.agent's shards) do not overwrite each other's page, search and options.
"""
from __future__ import annotations

import importlib.util
import itertools
import random

from dmr.envs.base import Observation, Task, Transition, split_seed
from dmr.envs.shop import FILE_SPLITS, SEARCH_PLACEHOLDER, SEP, parse_action

INSTALL = ("the real WebShop benchmark needs princeton-nlp/WebShop's `web_agent_site` package, which is not "
           "installed. PyPI's `webshop` is an empty stub: clone https://github.com/princeton-nlp/WebShop, run its "
           "`setup.sh -d all` (product data, spaCy en_core_web_lg, pyserini index; Java 11+) and "
           "`python -m spacy download en_core_web_sm` (its reward loads that one), and put the checkout on "
           "PYTHONPATH. Without it, use the embedded benchmark: env `shop` (dmr.envs.shop).")

GOAL_SEED = 0
_SERVERS: dict = {}
_ENV_IDS = itertools.count()


def available() -> bool:
    return importlib.util.find_spec("web_agent_site") is not None


def _text_env_class():
    if not available():
        raise ImportError(INSTALL)
    try:
        from web_agent_site.envs.web_agent_text_env import WebAgentTextEnv
    except OSError as e:  # spaCy's "[E050] Can't find model", raised while WebShop's reward module loads
        raise ImportError(f"web_agent_site is importable but its reward cannot load its spaCy model: {e}. "
                          "Install it: python -m spacy download en_core_web_sm") from e

    return WebAgentTextEnv


def strip_instruction(text: str) -> str:
    """WebShop's text pages repeat the instruction after 'Instruction:'; the prompt already has it."""
    parts = text.split(SEP)
    if "Instruction:" in parts:
        i = parts.index("Instruction:")
        parts = parts[:i] + parts[i + 2:]
    return SEP.join(p for p in parts if p.strip())


class WebShopEnv:
    """One WebShop episode at a time over WebAgentTextEnv (see module doc)."""

    name = "webshop"

    def __init__(self, max_steps: int = 30, num_products: int | None = None, human_goals: bool = True):
        if max_steps < 1:
            raise ValueError("max_steps must be >= 1")
        cls = _text_env_class()
        self.max_steps = max_steps
        key = (num_products, human_goals)
        state = random.getstate()
        random.seed(GOAL_SEED)
        try:
            # Loading products, goals and the index takes minutes: every env of a process shares one server.
            self.env = cls(observation_mode="text", num_products=num_products, human_goals=human_goals,
                           server=_SERVERS.get(key), session_prefix=f"dmr{next(_ENV_IDS)}-")
        except Exception as e:
            # pyserini's Java side fails with a bare IllegalArgumentException when the Lucene index of the
            # product set is missing (WebShop's search_engine/indexes*, built by its run_indexing.sh).
            if "IllegalArgument" in type(e).__name__ + str(e) or "indexes" in str(e):
                raise RuntimeError(
                    f"WebShop could not open its search index for num_products={num_products}: {e}. Build it "
                    "with WebShop's search_engine/run_indexing.sh (indexes for the full product set; "
                    "indexes_1k etc. for num_products=1000), or set env_kwargs.num_products to an indexed size"
                ) from e
            raise
        finally:
            random.setstate(state)
        _SERVERS[key] = self.env.server
        self.server = self.env.server
        self._task: Task | None = None
        self._done = True

    def tasks(self, split: str, n: int, offset: int = 0) -> list[Task]:
        split_seed(split, 0)  # validates the split name
        lo, hi = FILE_SPLITS[split]
        have = len(self.server.goals)
        if have <= lo:
            raise ValueError(f"WebShop's goal file has {have} goals, but its {split} split starts at goal {lo} "
                             f"(splits by goal index: {FILE_SPLITS}); use WebShop's full human goal file "
                             "(items_human_ins.json, 12087 goals), not a subset")
        hi = have if hi is None else min(hi, have)
        if offset < 0 or lo + offset + n > hi:
            raise ValueError(f"WebShop's {split} split has {hi - lo} goals; asked for {offset}..{offset + n - 1}")
        return [Task(self.name, split, i, lo + i, self.server.goals[lo + i].get("query", ""))
                for i in range(offset, offset + n)]

    # ------------------------------------------------------------------ pages
    def _page(self) -> tuple[bool, list[str]]:
        avail = self.env.get_available_actions()
        clicks = [c for c in avail["clickables"] if c != "search"]
        return avail["has_search_bar"], clicks

    def _admissible(self) -> list[str]:
        search, clicks = self._page()
        return ([SEARCH_PLACEHOLDER] if search else []) + [f"click[{c}]" for c in clicks]

    @property
    def step_type(self) -> str:
        return "search" if self._page()[0] else "click"

    def reset(self, task: Task) -> Observation:
        obs, _ = self.env.reset(session=task.seed)
        self._task, self._goal = task, self.server.user_sessions[self.env.session]["goal"]
        self._steps, self._done, self._won, self._score = 0, False, False, 0.0
        return Observation(text=strip_instruction(obs), goal=self._goal["instruction_text"],
                           admissible=self._admissible(),
                           info={"task_type": self._goal.get("query", ""), "target": self._goal["asin"],
                                 "max_steps": self.max_steps, "task_key": task.key, "next_step_type": self.step_type})

    def step(self, action: str) -> Transition:
        if self._task is None:
            raise RuntimeError("WebShopEnv.step called before reset()")
        if self._done:
            raise RuntimeError("WebShopEnv.step called after the episode ended; call reset() first")
        has_search, clicks = self._page()
        step_type = "search" if has_search else "click"
        self._steps += 1
        name, arg = parse_action(action) if isinstance(action, str) else ("", None)
        valid = bool(arg) and ((name == "search" and has_search and arg.lower() != "<your query>")
                               or (name == "click" and arg.lower() in clicks))
        if valid:
            obs, reward, done, _ = self.env.step(f"{name}[{arg}]")
            self._text = strip_instruction(obs)
            if done:
                self._done, self._score = True, float(reward)
                self._won = self._score >= 1.0 - 1e-9
        else:
            self._text = strip_instruction(self.env.observation)
        self._done = self._done or self._steps >= self.max_steps
        return Transition(text=self._text, admissible=[] if self._done else self._admissible(), done=self._done,
                          won=self._won, score=self._score, valid=valid,
                          info={"step_type": step_type, "next_step_type": self.step_type, "steps": self._steps,
                                "task_type": self._goal.get("query", "")})

    # ------------------------------------------------------------------ expert
    def expert_action(self) -> str:
        """A privileged expert: search the target's title, open the target, make each option the
        value the goal asks for (re-picking one that another click changed), buy. A value is asked
        for when it is a goal value, or failing that matches one as WebShop's reward does (thefuzz
        token-set ratio > 85 after its colour normalisation). (WebShop's reward can still fall
        short of 1 on its human goals, e.g. for attributes its fuzzy matching misses.)"""
        if self._task is None or self._done:
            raise RuntimeError("WebShopEnv.expert_action needs a running episode (reset first)")
        has_search, clicks = self._page()
        target = self._goal["asin"].lower()
        product = self.server.product_item_dict[self._goal["asin"]]
        if has_search:
            return f"search[{product['Title'].lower()}]"
        session = self.server.user_sessions[self.env.session]
        if session.get("asin") is None or session["asin"].lower() != target:
            if target in clicks:
                return f"click[{target}]"
            return "click[next >]" if "next >" in clicks else "click[back to search]"
        if "buy now" not in clicks:  # a sub page
            return "click[< prev]"
        goal_values = self._goal["goal_options"]
        goal_values = [str(v).lower() for v in (goal_values.values() if isinstance(goal_values, dict) else goal_values)]
        for name, values in product["options"].items():
            want = _asked_value(values, goal_values)
            # A value that two options share is one clickable, the last one's: it cannot set the other.
            radio = self.env.text_to_clickable.get(want)
            if (want is not None and session["options"].get(name) != want and radio is not None
                    and str(radio.get("name", "")).lower() == name):
                return f"click[{want}]"
        return "click[buy now]"


def _asked_value(values: list[str], goal_values: list[str]) -> str | None:
    """The one of an option's `values` that the goal asks for: a goal value itself, else the best
    match by WebShop's option matching (engine/goal.py's get_option_reward), else None."""
    exact = next((v for v in values if v in goal_values), None)
    if exact is not None or not goal_values or not values:
        return exact
    from thefuzz import fuzz
    from web_agent_site.engine.normalize import normalize_color

    ratio, best = max((max(fuzz.token_set_ratio(normalize_color(v), normalize_color(g)) for g in goal_values), v)
                      for v in values)
    return best if ratio > 85 else None
