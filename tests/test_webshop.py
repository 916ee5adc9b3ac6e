"""The real WebShop adapter (dmr.envs.webshop). WebShop is not pip-installable, so everything but
the missing-install message skips unless its `web_agent_site` package (with its data and search
index) is importable."""
from __future__ import annotations

import json

import pytest

from dmr import envs
from dmr.envs import webshop
from dmr.envs.shop import ShopEnv, search_document, write_search_documents
from tests.env_contract import check_contract

needs_webshop = pytest.mark.skipif(not webshop.available(), reason=(
    "web_agent_site not importable: clone princeton-nlp/WebShop, run its setup.sh -d all and put it on PYTHONPATH"))


@pytest.mark.skipif(webshop.available(), reason="WebShop is installed here")
def test_missing_install_names_what_to_install():
    with pytest.raises(ImportError, match="princeton-nlp/WebShop") as err:
        envs.make("webshop")
    for hint in ("empty stub", "setup.sh", "PYTHONPATH", "env `shop`"):
        assert hint in str(err.value), hint


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
