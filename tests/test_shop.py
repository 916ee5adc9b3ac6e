"""The embedded shop (dmr.envs.shop): WebShop's page flow, action grammar, BM25 search, reward, the
expert, step types, and the catalogue in WebShop's data-file formats. Real components throughout
(bm25s is the search engine)."""
from __future__ import annotations

import json
import random
import re

import pytest

from dmr.envs.base import SPLITS
from dmr.envs.shop import (
    SEARCH_PLACEHOLDER,
    TYPES,
    ShopEnv,
    generate_catalogue,
    load_webshop_files,
    make_goal,
    parse_action,
    reward,
    write_webshop_files,
)
from tests.env_contract import admits, check_contract

SMALL = {"n_products": 300}


def play(env, task, noise=0.0, rng=None):
    obs = env.reset(task)
    admissible = obs.admissible
    while True:
        expert = env.expert_action()
        assert admits(expert, admissible), (task.key, expert, admissible)
        action = rng.choice(admissible) if noise and rng.random() < noise else expert
        tr = env.step(action)
        admissible = tr.admissible
        if tr.done:
            return tr


def test_contract_generated():
    check_contract(lambda: ShopEnv(**SMALL), n=5)
    check_contract(lambda: ShopEnv(**SMALL), split="train", n=3)


def test_contract_on_files_written_in_webshop_format(tmp_path):
    env = ShopEnv(**SMALL)
    goals = [env.goal_of(t) for s in SPLITS for t in env.tasks(s, 20)]
    write_webshop_files(env.products, goals, tmp_path)
    check_contract(lambda: ShopEnv(data_dir=str(tmp_path)), n=3)


# ---------------------------------------------------------------------- the expert

@pytest.mark.parametrize("split,n", [("test", 1500), ("calib", 300), ("train", 300)])
def test_expert_wins_generated_tasks(split, n):
    env = ShopEnv()
    won, steps = 0, []
    for task in env.tasks(split, n):
        tr = play(env, task)
        won += tr.won
        assert tr.won or tr.info["steps"] == env.max_steps, task.key  # it never buys the wrong thing
        steps.append(tr.info["steps"])
    # It only opens products whose title and price fit, so a loss is a run of decoys that lack the
    # goal's options until the 30-step limit; measured 994/1000 on train.
    assert won >= 0.99 * n
    assert min(steps) >= 3 and sum(steps) / n <= 10


def _shown(text: str) -> list[tuple[str, str, float]]:
    """(asin, title, price) of the products a results page shows, read from its text only."""
    parts = text.split(" [SEP] ")
    return [(parts[i].lower(), parts[i + 1].lower(), float(parts[i + 2].lstrip("$")))
            for i in range(len(parts) - 2) if re.fullmatch(r"B0[0-9A-Z]{8}", parts[i])]


def test_expert_chooses_from_what_the_page_shows():
    """On a results page the expert opens the first product whose title has the instruction's
    attributes and type and whose price is under the instruction's bound, skipping only products
    it opened before: a choice an agent can make from its prompt (no hidden target)."""
    env = ShopEnv(**SMALL)
    checked = 0
    for task in env.tasks("train", 150):
        obs = env.reset(task)
        goal, text, opened = obs.goal, obs.text, []
        bound = float(re.search(r"lower than ([0-9.]+) dollars", goal).group(1))
        attrs = re.match(r"(?:i am looking for|i need|i want to buy|find me) (.*?) " + re.escape(task.task_type) + r"\b",
                         goal).group(1).split(" and ")
        while True:
            action = env.expert_action()
            if action.startswith("click[B0"):
                fit = [a for a, title, price in _shown(text)
                       if all(x in title for x in attrs) and task.task_type in title and price <= bound and a not in opened]
                assert fit and action.lower() == f"click[{fit[0]}]", (task.key, action, fit)
                opened.append(fit[0])
                checked += 1
            tr = env.step(action)
            text = tr.text
            if tr.done:
                break
    assert checked >= 150


def test_expert_relabels_states_off_its_path():
    """Random admissible actions injected 30% of the time: the expert's label is always admissible,
    and after the noise stops it still finishes with score 1 unless the noise bought something."""
    env, rng = ShopEnv(**SMALL), random.Random(0)
    won = 0
    for task in env.tasks("train", 200):
        tr = play(env, task, noise=0.3, rng=rng)
        won += tr.won
        assert 0.0 <= tr.score <= 1.0
    assert won > 60  # a random "Buy Now" or a search for the placeholder text costs some episodes


# ---------------------------------------------------------------------- reward (hand cases)

@pytest.fixture(scope="module")
def shop():
    return ShopEnv(**SMALL)


def _case(shop, pred):
    rng = random.Random(1)
    for p in shop.products:
        g = make_goal(p, rng)
        if pred(p, g):
            return p, g
    raise AssertionError("no product matches")


def test_reward_right_product_and_options_is_one(shop):
    for p in shop.products[:200]:
        g = make_goal(p, random.Random(p["asin"]))
        r = reward(p, g, p["pricing"][0], dict(g["goal_options"]), shop.lexicon)
        assert r["score"] == 1.0 and r["r_type"] == 1.0, (p["Title"], g)


def test_reward_wrong_option(shop):
    p, g = _case(shop, lambda p, g: len(g["goal_options"]) == 2 and len(g["attributes"]) == 1)
    name = sorted(g["goal_options"])[0]
    wrong = next(v for v in p["options"][name] if v != g["goal_options"][name])
    chosen = {**g["goal_options"], name: wrong}
    # (1 attribute + 1 of 2 options + price) / (1 + 2 + 1)
    assert reward(p, g, p["pricing"][0], chosen, shop.lexicon)["score"] == pytest.approx(3 / 4)
    # An option left unselected counts the same as a wrong one.
    del chosen[name]
    assert reward(p, g, p["pricing"][0], chosen, shop.lexicon)["score"] == pytest.approx(3 / 4)


def test_reward_wrong_option_never_scores_one(shop):
    rng = random.Random(2)
    for p in shop.products:
        g = make_goal(p, rng)
        for name, want in g["goal_options"].items():
            for v in p["options"][name]:
                if v != want:
                    chosen = {**g["goal_options"], name: v}
                    assert reward(p, g, p["pricing"][0], chosen, shop.lexicon)["score"] < 1.0, (p["Title"], name, v)


def test_reward_over_price(shop):
    p, g = _case(shop, lambda p, g: len(g["goal_options"]) == 1 and len(g["attributes"]) == 2)
    r = reward(p, g, g["price_upper"] + 0.01, dict(g["goal_options"]), shop.lexicon)
    assert r["r_price"] is False and r["score"] == pytest.approx(3 / 4)
    assert reward(p, g, g["price_upper"], dict(g["goal_options"]), shop.lexicon)["score"] == 1.0


def test_reward_wrong_type(shop):
    p, g = _case(shop, lambda p, g: p["category"] == "beauty")
    other = next(q for q in shop.products if q["category"] == "electronics")
    r = reward(other, g, 1.0, {}, shop.lexicon)
    assert not r["query_match"] and not r["category_match"] and r["r_type"] == 0.0 and r["score"] == 0.0
    # Same type, another brand, same attributes and options: the type still matches.
    twin = next(q for q in shop.products if q["query"] == p["query"] and q["asin"] != p["asin"]
                and set(g["attributes"]) <= set(q["Attributes"])
                and all(v in q["options"].get(k, []) for k, v in g["goal_options"].items())
                and q["pricing"][0] <= g["price_upper"])
    assert reward(twin, g, twin["pricing"][0], dict(g["goal_options"]), shop.lexicon)["score"] == 1.0


def test_reward_missing_attribute(shop):
    p, g = _case(shop, lambda p, g: len(g["attributes"]) == 2 and not g["goal_options"])
    g = {**g, "attributes": g["attributes"][:1] + ["glow in the dark"]}
    assert reward(p, g, p["pricing"][0], {}, shop.lexicon)["score"] == pytest.approx(2 / 3)


# ---------------------------------------------------------------------- pages, actions, step types

def test_page_flow_and_step_types():
    env = ShopEnv(**SMALL)
    task = env.tasks("test", 1)[0]
    obs = env.reset(task)
    assert obs.text == "WebShop [SEP] Search" and obs.admissible == [SEARCH_PLACEHOLDER]
    assert obs.info["next_step_type"] == "search"
    goal = env.goal_of(task)
    tr = env.step(f"search[{goal['query']}]")
    assert tr.valid and tr.info["step_type"] == "search" and tr.info["next_step_type"] == "click"
    assert tr.text.startswith("Back to Search [SEP] Page 1 (Total results: ")
    assert "click[next >]" in tr.admissible and "click[< prev]" not in tr.admissible
    asins = [a[6:-1] for a in tr.admissible if a.startswith("click[B0")]
    assert len(asins) == 10
    page1 = tr.text
    tr = env.step("click[Next >]")  # clickables are case-insensitive, as in WebShop
    assert tr.valid and "Page 2" in tr.text and "click[< prev]" in tr.admissible
    assert env.step("click[< prev]").text == page1
    tr = env.step(f"click[{asins[0]}]")
    assert tr.info["page"] == "item" and tr.info["step_type"] == "click"
    for sub in ("description", "features", "reviews"):
        assert f"click[{sub}]" in tr.admissible
    item = tr.text
    tr = env.step("click[features]")
    assert tr.info["page"] == "Features" and tr.admissible == ["click[back to search]", "click[< prev]"]
    assert env.step("click[< prev]").text == item
    p = env.by_asin[asins[0].upper()]
    if p["options"]:
        value = next(iter(p["options"].values()))[0]
        tr = env.step(f"click[{value}]")
        assert f"[clicked] {value}" in tr.text and tr.info["page"] == "item"
    assert env.step("click[< prev]").text == page1  # item -> the results page it came from
    tr = env.step("click[back to search]")
    assert tr.text == obs.text and tr.info["next_step_type"] == "search" and tr.admissible == [SEARCH_PLACEHOLDER]
    tr = env.step(f"search[{goal['query']}]")
    tr = env.step(f"click[{asins[0]}]")
    assert "[clicked]" not in tr.text  # a new visit starts with no options chosen
    tr = env.step("click[buy now]")
    assert tr.done and tr.info["page"] == "done" and tr.text.startswith("Thank you for shopping with us!")
    assert tr.info["step_type"] == "click" and tr.admissible == []


def test_bad_actions_leave_the_page_and_count():
    env = ShopEnv(**SMALL, max_steps=30)
    obs = env.reset(env.tasks("test", 1)[0])
    bad = ["", "xyzzy", "search[]", "search[<your query>]", "click[search]", "click[buy now]", "click[",
           "search[shampoo", "click[back to search]"]
    for i, action in enumerate(bad, 1):
        tr = env.step(action)
        assert not tr.valid and tr.text == obs.text and tr.info["steps"] == i and not tr.done, action
    tr = env.step("search[shampoo]")
    results = tr.text
    for action in ["search[tea]", "click[b0nothere00]", "click[description]", "click[buy now]", "click[< prev]"]:
        tr = env.step(action)
        assert not tr.valid and tr.text == results and tr.info["next_step_type"] == "click", action


def test_max_steps_ends_with_score_zero():
    env = ShopEnv(**SMALL, max_steps=4)
    env.reset(env.tasks("test", 2)[1])
    for _ in range(3):
        assert not env.step("click[nothing]").done
    tr = env.step("search[tea]")
    assert tr.done and not tr.won and tr.score == 0.0
    with pytest.raises(RuntimeError, match="ended"):
        env.step("click[back to search]")


def test_parse_action():
    assert parse_action("search[red shoes]") == ("search", "red shoes")
    assert parse_action(" Click[Buy Now] ") == ("click", "Buy Now")
    assert parse_action("buy") == ("buy", None)


def test_search_ranks_matching_titles_first(shop):
    for kind in TYPES:
        hits = shop.search(kind)
        assert 0 < len(hits) <= 50
        assert shop.by_asin[hits[0]]["query"] == kind, kind
    assert shop.search("qwertyuiop zxcvb") == []
    env = ShopEnv(**SMALL)
    env.reset(env.tasks("test", 1)[0])
    tr = env.step("search[qwertyuiop zxcvb]")
    assert tr.valid and "Total results: 0" in tr.text and tr.admissible == ["click[back to search]"]


# ---------------------------------------------------------------------- catalogue, goals, splits

def test_catalogue_is_seeded_and_well_formed():
    a, b = generate_catalogue(200, seed=3), generate_catalogue(200, seed=3)
    assert a == b and a != generate_catalogue(200, seed=4)
    assert len({p["asin"] for p in a}) == 200
    for p in a:
        assert len(p["asin"]) == 10 and p["asin"].startswith("B0")
        values = [v for vals in p["options"].values() for v in vals]
        assert len(values) == len(set(values)), "an option value must name one option"
        assert p["query"] in TYPES and p["Attributes"] and p["pricing"][0] > 0
    with pytest.raises(ValueError, match="n_products"):
        generate_catalogue(3)


def test_splits_are_disjoint_and_tasks_rebuild():
    env = ShopEnv(**SMALL)
    keys = {s: {t.seed for t in env.tasks(s, 500)} for s in SPLITS}
    assert not keys["train"] & keys["test"] and not keys["calib"] & keys["test"] and not keys["train"] & keys["calib"]
    t = env.tasks("test", 1, offset=7)[0]
    assert env.goal_of(t) == ShopEnv(**SMALL).goal_of(t)
    goals = {env.goal_of(t)["instruction_text"] for t in env.tasks("test", 200)}
    assert len(goals) > 190


def test_catalogue_round_trips_through_webshop_files(tmp_path):
    env = ShopEnv(**SMALL)
    goals = [env.goal_of(t) for t in env.tasks("test", 50)]
    paths = write_webshop_files(env.products, goals, tmp_path)
    # The raw formats WebShop's load_products / get_human_goals read.
    items = json.loads(paths["items"].read_text())
    assert isinstance(items, list) and len(items) == len(env.products)
    assert {"asin", "name", "full_description", "small_description", "pricing", "customization_options",
            "images", "category", "query", "product_category"} <= set(items[0])
    assert items[0]["pricing"].startswith("$")
    ins = json.loads(paths["attributes"].read_text())
    assert set(ins) == {p["asin"] for p in env.products} and all("attributes" in v for v in ins.values())
    human = json.loads(paths["human"].read_text())
    assert all({"instruction", "instruction_attributes", "instruction_options"} <= set(i) for v in human.values() for i in v)
    reviews = json.loads(paths["reviews"].read_text())
    assert {"asin", "reviews", "average_rating"} <= set(reviews[0])

    products, loaded = load_webshop_files(tmp_path)
    assert products == env.products
    key = lambda g: g["instruction_text"]  # noqa: E731
    assert sorted(loaded, key=key) == sorted(goals, key=key)


def test_loaded_files_split_like_webshop(tmp_path):
    env = ShopEnv(**SMALL)
    goals = [env.goal_of(t) for t in env.tasks("train", 600)]
    write_webshop_files(env.products, goals, tmp_path)
    fenv = ShopEnv(data_dir=str(tmp_path))
    assert len(fenv.tasks("test", 500)) == 500
    assert [t.seed for t in fenv.tasks("calib", 3)] == [500, 501, 502]
    with pytest.raises(ValueError, match="has 100 goals"):
        fenv.tasks("calib", 101)
    with pytest.raises(FileNotFoundError, match="items_shuffle"):
        ShopEnv(data_dir=str(tmp_path / "empty"))
    for task in fenv.tasks("test", 100):
        assert play(fenv, task).won
