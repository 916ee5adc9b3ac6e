"""ShopEnv: an embedded WebShop (Yao et al., 2022) over a generated, seeded product catalogue.

WebShop's protocol, re-implemented without its web stack:

- **Catalogue**: products with WebShop's loaded-product fields (asin, Title, category, query,
  product_category, Description, BulletPoints, pricing/Price, options, Attributes, Reviews,
  Rating), generated from a seed; or read from WebShop's own data files (`data_dir`:
  items_shuffle*.json, items_ins_v2*.json, items_human_ins.json, reviews.json). `write_webshop_files`
  writes a generated catalogue in those formats, so WebShop's code can serve it too.
- **Pages and actions**: search page -> results (10 per page, `< Prev` / `Next >`) -> item page
  (option values, Description / Features / Reviews, Buy Now) -> sub pages; `Back to Search` from
  every page but the first. Actions are `search[query]` (only where the search bar is) and
  `click[name]` (a clickable of the page, case-insensitive). Observations are WebShop's simple text
  mode (page texts joined by ` [SEP] `), without the instruction, which the prompt carries.
- **Search**: BM25 (bm25s) over WebShop's document text (title, description, first bullet point,
  options), top 50 hits with a positive score.
- **Reward**: WebShop's `get_reward`: (attribute matches + option matches + price ok) /
  (attributes + options + 1), times the type reward. Two substitutions, both because this
  catalogue is generated: fuzzy token-set matching (thefuzz > 85) becomes token-set containment,
  and spaCy's noun tagging of titles becomes a lexicon of the catalogue's product-type nouns and
  brand names. Success is score 1.
- **Step types** (paper App. C.1): a step taken on the search page is a `search` step, any other a
  `click` step. `info["next_step_type"]` (in reset's and step's info) announces the type of the
  upcoming step before the agent generates it, so routing can force search steps to bf16.

Splits: generated goals are a pure function of the task seed (train / calib / test seeds are
disjoint); goals read from files are split as WebShop's evaluations do (the first 500 are test,
the next 1000 calib, the rest train).
"""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

from dmr.envs.base import Observation, Task, Transition, split_seed

SEP = " [SEP] "
SEARCH_RETURN_N = 50
PRODUCT_WINDOW = 10
PRICE_RANGE = [10.0 * i for i in range(1, 100)]
EXACT_MATCH_OPTS = ("size",)
END_BUTTON, NEXT_PAGE, PREV_PAGE, BACK_TO_SEARCH = "Buy Now", "Next >", "< Prev", "Back to Search"
SUB_PAGES = ("Description", "Features", "Reviews")
SEARCH_PLACEHOLDER = "search[<your query>]"
# WebShop's split of its goal list (as in its baselines and in verl-agent).
FILE_SPLITS = {"test": (0, 500), "calib": (500, 1500), "train": (1500, None)}

# product type -> (category, sub-category, attribute pool, option pools). Option values never
# repeat across a product's option names, so a click on a value is unambiguous, and no option value
# is a substring of a title or bullet (WebShop's reward credits an option found there, so "blue"
# next to "bluetooth" would make a wrong colour score 1).
_SIZES = ["small", "medium", "large", "x-large"]
_COLORS = ["black", "white", "navy blue", "red", "grey", "green", "pink", "beige"]
TYPES = {
    "shampoo": ("beauty", "hair care", ["sulfate free", "paraben free", "dry hair", "natural ingredients", "long lasting"],
                {"size": ["8 fl oz", "12 fl oz", "16 fl oz"], "scent": ["lavender", "coconut", "mint", "citrus"]}),
    "lipstick": ("beauty", "makeup", ["long lasting", "cruelty free", "matte finish", "vegan", "easy carry"],
                 {"color": ["ruby red", "nude", "rose pink", "berry", "coral"]}),
    "moisturizer": ("beauty", "skin care", ["sensitive skin", "fragrance free", "hyaluronic acid", "oil free", "anti aging"],
                    {"size": ["1.7 oz", "3.4 oz", "6.7 oz"]}),
    "deodorant": ("beauty", "personal care", ["aluminum free", "long lasting", "natural ingredients", "travel size"],
                  {"scent": ["lavender", "coconut", "unscented", "cedar"], "size": ["2.6 oz", "pack of 2", "pack of 3"]}),
    "t-shirt": ("fashion", "men clothing", ["machine wash", "short sleeve", "slim fit", "cotton", "moisture wicking"],
                {"color": _COLORS, "size": _SIZES}),
    "sneakers": ("fashion", "shoes", ["non slip", "rubber sole", "memory foam", "lightweight", "breathable"],
                 {"color": _COLORS[:6], "size": ["7", "8", "9", "10", "11"]}),
    "jacket": ("fashion", "women clothing", ["water resistant", "long sleeve", "machine wash", "hooded", "fleece lined"],
               {"color": _COLORS, "size": _SIZES}),
    "dress": ("fashion", "women clothing", ["long sleeve", "machine wash", "slim fit", "floral print", "v neck"],
              {"color": _COLORS, "size": _SIZES}),
    "coffee": ("grocery", "beverages", ["gluten free", "dark roast", "fair trade", "decaf", "single serve"],
               {"flavor": ["hazelnut", "vanilla", "caramel", "original"], "size": ["12 count", "24 count", "48 count"]}),
    "snack bars": ("grocery", "snacks", ["gluten free", "high protein", "low sugar", "non gmo", "keto friendly"],
                   {"flavor": ["chocolate", "peanut butter", "almond", "berry"], "size": ["6 count", "12 count"]}),
    "tea": ("grocery", "beverages", ["caffeine free", "organic", "herbal", "non gmo", "individually wrapped"],
            {"flavor": ["chamomile", "green", "peppermint", "earl grey"], "size": ["20 count", "40 count"]}),
    "headphones": ("electronics", "audio", ["noise cancelling", "wireless", "long battery life", "fast charging", "bluetooth"],
                   {"color": ["black", "white", "silver", "navy"]}),
    "phone charger": ("electronics", "accessories", ["fast charging", "usb c", "wall mount", "easy carry", "high speed"],
                      {"color": ["black", "white"], "size": ["3 ft", "6 ft", "10 ft"]}),
    "keyboard": ("electronics", "computer accessories", ["wireless", "backlit", "ergonomic", "water resistant", "easy install"],
                 {"color": ["black", "white", "grey"]}),
    "desk lamp": ("furniture", "lighting", ["easy assemble", "dimmable", "usb port", "energy saving", "led light"],
                  {"color": ["black", "white", "silver", "gold"]}),
    "office chair": ("furniture", "home office",
                     ["lumbar support", "easy assemble", "height adjustable", "heavy duty", "mesh back"],
                     {"color": ["black", "grey", "white", "navy"]}),
    "bookshelf": ("furniture", "living room", ["easy assemble", "solid wood", "space saving", "storage space"],
                  {"color": ["white", "espresso", "oak", "black"], "size": ["3 tier", "4 tier", "5 tier"]}),
}
CATEGORY_PATH = {"beauty": "Beauty & Personal Care", "fashion": "Clothing, Shoes & Jewelry",
                 "grocery": "Grocery & Gourmet Food", "electronics": "Electronics", "furniture": "Home & Kitchen"}
BRANDS = ("Lumora", "Vantix", "Orvella", "Kestro", "Brindle", "Solvane", "Quenby", "Marlowe", "Tidewell",
          "Fennick", "Halvard", "Ostrava", "Pellucid", "Rowan", "Zephra", "Calloway")
_DESC = ("Designed for everyday use.", "Made with care and tested for quality.", "A customer favourite.",
         "Backed by a one year guarantee.", "Thoughtfully made for your routine.")
_REVIEW_TITLES = ("Great value", "Works as described", "Not bad", "Love it", "Would buy again")

_WORD = re.compile(r"[a-z0-9]+")


def tokens(text: str) -> set[str]:
    return set(_WORD.findall(text.lower()))


def parse_action(action: str) -> tuple[str, str | None]:
    """('search' | 'click' | other, argument): WebShop's `name[arg]` grammar."""
    m = re.fullmatch(r"\s*(\w+)\[(.+)\]\s*", action, re.DOTALL)
    if m is None:
        return action.strip(), None
    return m.group(1).lower(), m.group(2).strip()


# ---------------------------------------------------------------------- catalogue

def _asin(rng: random.Random, taken: set) -> str:
    while True:
        a = "B0" + "".join(rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ0123456789") for _ in range(8))
        if a not in taken:
            taken.add(a)
            return a


def generate_catalogue(n_products: int = 1000, seed: int = 0) -> list[dict]:
    """`n_products` products in WebShop's loaded-product form (see module doc), a pure function of seed."""
    if n_products < len(TYPES):
        raise ValueError(f"n_products must be >= {len(TYPES)} (one per product type), got {n_products}")
    rng, taken, products = random.Random(f"shop-catalogue/{seed}"), set(), []
    types = sorted(TYPES)
    for i in range(n_products):
        kind = types[i % len(types)]
        cat, sub, attr_pool, opt_pools = TYPES[kind]
        brand = rng.choice(BRANDS)
        attrs = sorted(rng.sample(attr_pool, rng.randint(1, 3)))
        options = {name: sorted(rng.sample(pool, rng.randint(2, min(4, len(pool)))), key=pool.index)
                   for name, pool in opt_pools.items() if rng.random() < 0.85}
        price = round(rng.uniform(5.0, 90.0), 2)
        title = f"{brand} {' '.join(a.title() for a in attrs)} {kind.title()}"
        bullets = [f"{a.capitalize()}." for a in attrs] + [f"{kind.capitalize()} by {brand}."]
        reviews = [{"title": rng.choice(_REVIEW_TITLES), "score": rng.randint(3, 5),
                    "body": f"This {kind} is {rng.choice(('great', 'fine', 'good', 'excellent'))}."}
                   for _ in range(rng.randint(1, 3))]
        products.append({
            "asin": _asin(rng, taken), "name": title, "Title": title, "category": cat, "query": kind,
            "product_category": f"{CATEGORY_PATH[cat]} › {sub.title()} › {kind.title()}",
            "Description": f"{brand} {kind}. {rng.choice(_DESC)}", "BulletPoints": bullets,
            "pricing": [price], "Price": f"${price}", "options": options, "Attributes": attrs,
            "Reviews": reviews, "Rating": round(sum(r["score"] for r in reviews) / len(reviews), 1),
        })
    return products


def _price_upper(rng: random.Random, price: float) -> float:
    # WebShop: two of the four round prices above the product's price, the larger of them.
    above = [p for p in PRICE_RANGE if p > price][:4]
    return sorted(rng.sample(above, 2))[1] if len(above) >= 2 else 1000000.0


def make_goal(product: dict, rng: random.Random) -> dict:
    """A purchase goal whose target is `product`: some of its attributes, one value per option, a
    price bound above its price (WebShop's synthetic goal recipe)."""
    attrs = sorted(rng.sample(product["Attributes"], rng.randint(1, len(product["Attributes"]))))
    goal_options = {k: rng.choice(v) for k, v in sorted(product["options"].items())}
    upper = _price_upper(rng, product["pricing"][0])
    kind = product["query"]
    lead = rng.choice(("i am looking for", "i need", "i want to buy", "find me"))
    base = f"{lead} {' and '.join(attrs)} {kind}"
    option_text = ", and ".join(f"{k}: {v}" for k, v in goal_options.items())
    instruction = base + (f" with {option_text}" if option_text else "")
    price_text = f", and price lower than {upper:.2f} dollars" if upper < 1000000 else ""
    # `instruction` is the text before the price bound: what WebShop's human-goal file stores.
    return {"asin": product["asin"], "category": product["category"], "query": product["query"],
            "name": product["Title"], "product_category": product["product_category"],
            "instruction": instruction, "instruction_text": instruction + price_text,
            "attributes": attrs, "price_upper": upper, "goal_options": goal_options,
            # The instruction's own span after the lead: an agent copies it whole (a contiguous
            # span is the easiest copy for a small model), and BM25 ignores the "and".
            "search_query": f"{' and '.join(attrs)} {kind}"}


# ---------------------------------------------------------------------- WebShop's data files

def write_webshop_files(products: list[dict], goals: list[dict], out: str | Path) -> dict[str, Path]:
    """The catalogue and goals in WebShop's raw data-file formats: items_shuffle.json (products),
    items_ins_v2.json (attributes per asin), items_human_ins.json (instructions per asin) and
    reviews.json. As in WebShop's human goals, an instruction states its option values in words and
    `instruction_options` lists the values (WebShop's reward scores a name-keyed dict's (name, value)
    pairs, not its values). Extra keys that WebShop ignores keep what its loader would re-randomise
    (the price bound), recompute (the expert's search query) or lose (the options' names)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    items = [{"asin": p["asin"], "name": p["Title"], "category": p["category"], "query": p["query"],
              "product_category": p["product_category"], "full_description": p["Description"],
              "small_description": p["BulletPoints"], "pricing": " ".join(f"${x:.2f}" for x in p["pricing"]),
              "images": [""], "customization_options": {k: [{"value": v, "image": None} for v in vals]
                                                        for k, vals in p["options"].items()} or None}
             for p in products]
    ins = {p["asin"]: {"attributes": p["Attributes"]} for p in products}
    human: dict[str, list] = {}
    for g in goals:
        opts = g["goal_options"]
        values = list(opts.values()) if isinstance(opts, dict) else list(opts)
        human.setdefault(g["asin"], []).append({
            "asin": g["asin"], "instruction": g["instruction"], "instruction_attributes": g["attributes"],
            "instruction_options": values, "goal_options": opts, "price_upper": g["price_upper"],
            "search_query": g.get("search_query", "")})
    reviews = [{"asin": p["asin"], "average_rating": p["Rating"],
                "reviews": [{"title": r["title"], "stars": r["score"], "review": r["body"]} for r in p["Reviews"]]}
               for p in products]
    paths = {"items": out / "items_shuffle.json", "attributes": out / "items_ins_v2.json",
             "human": out / "items_human_ins.json", "reviews": out / "reviews.json"}
    for key, data in (("items", items), ("attributes", ins), ("human", human), ("reviews", reviews)):
        paths[key].write_text(json.dumps(data, indent=0))
    return paths


def search_document(p: dict) -> str:
    """WebShop's search-document text of a product: title, description, first bullet, options."""
    opts = ", and ".join(f"{k}: {', '.join(v)}" for k, v in p["options"].items())
    return " ".join([p["Title"], p["Description"], (p["BulletPoints"] or [""])[0], opts]).lower()


def write_search_documents(products: list[dict], out: str | Path) -> Path:
    """documents.jsonl in the form WebShop's pyserini indexing script reads (id, contents, product)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps({"id": p["asin"], "contents": search_document(p), "product": p}) + "\n"
                           for p in products))
    return out


def _find(data_dir: Path, stem: str) -> Path:
    hits = sorted(data_dir.glob(f"{stem}*.json"))
    if not hits:
        raise FileNotFoundError(f"{data_dir}: no {stem}*.json (WebShop's data files: items_shuffle*.json, "
                                "items_ins_v2*.json, items_human_ins.json, reviews.json)")
    return hits[0]


def load_webshop_files(data_dir: str | Path) -> tuple[list[dict], list[dict]]:
    """(products, goals) from WebShop's raw data files, converted as WebShop's `load_products` and
    `get_human_goals` do (goals in file order; a goal without a stored bound gets WebShop's draw)."""
    data_dir = Path(data_dir)
    raw = json.loads(_find(data_dir, "items_shuffle").read_text())
    attrs = json.loads(_find(data_dir, "items_ins_v2").read_text())
    human = json.loads(_find(data_dir, "items_human_ins").read_text())
    reviews_path = data_dir / "reviews.json"
    reviews = {r["asin"]: r for r in json.loads(reviews_path.read_text())} if reviews_path.exists() else {}
    products, seen = [], set()
    for p in raw:
        asin = p["asin"]
        if asin == "nan" or len(asin) > 10 or asin in seen:
            continue
        seen.add(asin)
        pricing = [float(re.sub(r"[^\d.]", "", x)) for x in (p.get("pricing") or "").split("$")[1:]][:2] or [100.0]
        options = {}
        for name, contents in (p.get("customization_options") or {}).items():
            if contents:
                options[name.lower()] = [c["value"].strip().replace("/", " | ").lower() for c in contents]
        rv = reviews.get(asin, {})
        small = p["small_description"]
        products.append({
            "asin": asin, "name": p["name"], "Title": p["name"], "category": p["category"],
            "query": p["query"].lower().strip(), "product_category": p["product_category"],
            "Description": p["full_description"], "BulletPoints": small if isinstance(small, list) else [small],
            "pricing": pricing, "Price": f"${pricing[0]}" if len(pricing) == 1 else f"${pricing[0]} to ${pricing[1]}",
            "options": options, "Attributes": attrs.get(asin, {}).get("attributes", ["DUMMY_ATTR"]),
            "Reviews": [{"title": r.get("title", ""), "score": r.get("score", r.get("stars")),
                         "body": r.get("body", r.get("review", ""))} for r in rv.get("reviews", [])],
            "Rating": rv.get("average_rating", "N.A."),
        })
    by_asin = {p["asin"]: p for p in products}
    goals, rng = [], random.Random(233)
    for asin, instructions in human.items():
        if asin not in by_asin:
            continue
        p = by_asin[asin]
        for ins in instructions:
            if not ins.get("instruction_attributes"):
                continue
            # Goals written by write_webshop_files keep their options' names and their bound; WebShop's
            # human goals list bare option values and get a drawn bound. Both say their options in words.
            opts = ins.get("goal_options") or ins.get("instruction_options") or {}
            if isinstance(opts, list):
                opts = {str(i): v for i, v in enumerate(opts)}
            base = ins["instruction"].strip().strip(".")
            upper = ins["price_upper"] if "price_upper" in ins else _price_upper(rng, p["pricing"][0])
            price_text = f", and price lower than {upper:.2f} dollars" if upper < 1000000 else ""
            goals.append({"asin": asin, "category": p["category"], "query": p["query"], "name": p["Title"],
                          "product_category": p["product_category"], "instruction": base,
                          "instruction_text": base + price_text,
                          "attributes": ins["instruction_attributes"], "price_upper": upper, "goal_options": opts,
                          "search_query": ins.get("search_query") or base})
    return products, goals


# ---------------------------------------------------------------------- reward (WebShop's get_reward)

def _fuzzy_match(a: str, b: str) -> bool:
    # Stand-in for thefuzz's token_set_ratio > 85: one phrase's words contain the other's.
    ta, tb = tokens(a), tokens(b)
    return bool(ta) and bool(tb) and (ta <= tb or tb <= ta)


def _in_text(value: str, p: dict) -> bool:
    v = value.lower()
    return v in p["Title"].lower() or v in " ".join(p["BulletPoints"]).lower() or v in p["Description"].lower()


def type_nouns(title: str, lexicon: set[str]) -> set[str]:
    return {t for t in tokens(title) if t in lexicon}


def reward(product: dict, goal: dict, price: float, options: dict, lexicon: set[str]) -> dict:
    """WebShop's reward of buying `product` at `price` with `options` selected, for `goal`.
    Returns the score and its parts."""
    query_match = product["query"] == goal["query"]
    cats = lambda s: {x.strip() for x in s.split("›")}  # noqa: E731
    category_match = len(cats(product["product_category"]) & cats(goal["product_category"])) >= 2
    want = type_nouns(goal["name"], lexicon)
    title_score = len(type_nouns(product["Title"], lexicon) & want) / len(want) if want else 0.2
    r_type = 1.0 if (query_match or category_match or title_score > 0.2) else 0.5
    if title_score < 0.1:
        r_type = 0.1
    if title_score == 0.0:
        r_type = 0.0
    r_price = price <= goal["price_upper"] if goal["price_upper"] > 0 else None
    n_attr = 0
    for g in goal["attributes"]:
        if any(_fuzzy_match(a, g) for a in product["Attributes"]) or _in_text(g, product):
            n_attr += 1
    goal_values = [v.lower() for v in (goal["goal_options"].values() if isinstance(goal["goal_options"], dict)
                                       else goal["goal_options"])]
    n_opt = 0
    for k, v in options.items():
        v = v.lower()
        if k.lower() in EXACT_MATCH_OPTS:
            hit = v in goal_values
        else:
            hit = any(_fuzzy_match(g, v) for g in goal_values)
        n_opt += bool(hit or _in_text(v, product))
    total = (n_attr + n_opt + bool(r_price)) / (len(goal["attributes"]) + len(goal_values) + 1) * r_type
    return {"score": total, "r_type": r_type, "n_attr": n_attr, "n_opt": n_opt, "r_price": r_price,
            "query_match": query_match, "category_match": category_match, "title_score": title_score}


# ---------------------------------------------------------------------- search engine

class Search:
    """BM25 (bm25s) over WebShop's search documents: title, description, first bullet, options."""

    def __init__(self, products: list[dict]):
        import bm25s

        self.asins = [p["asin"] for p in products]
        docs = [search_document(p) for p in products]
        self.tokenizer = bm25s.tokenization.Tokenizer(stopwords="en")
        self.bm25 = bm25s.BM25()
        self.bm25.index(self.tokenizer.tokenize(docs, show_progress=False), show_progress=False)

    def __call__(self, query: str, k: int = SEARCH_RETURN_N) -> list[str]:
        ids = self.tokenizer.tokenize([query.lower()], update_vocab=False, show_progress=False)
        k = min(k, len(self.asins))
        docs, scores = self.bm25.retrieve(ids, k=k, show_progress=False)
        return [self.asins[int(d)] for d, s in zip(docs[0], scores[0]) if s > 0]


_WORLDS: dict = {}


def _world(n_products: int, catalogue_seed: int, data_dir: str | None):
    """(products, goals, by_asin, search, lexicon), built once per process per catalogue."""
    key = (n_products, catalogue_seed, data_dir)
    if key not in _WORLDS:
        if data_dir is not None:
            products, goals = load_webshop_files(data_dir)
            lexicon = set()
            for p in products:
                lexicon |= tokens(p["query"])
        else:
            products, goals = generate_catalogue(n_products, catalogue_seed), None
            lexicon = set().union(*(tokens(t) for t in TYPES), *(tokens(b) for b in BRANDS))
        _WORLDS[key] = (products, goals, {p["asin"]: p for p in products}, Search(products), lexicon)
    return _WORLDS[key]


# ---------------------------------------------------------------------- environment

class ShopEnv:
    """One WebShop episode at a time (see module doc)."""

    name = "shop"

    def __init__(self, max_steps: int = 30, n_products: int = 1000, catalogue_seed: int = 0,
                 page_size: int = PRODUCT_WINDOW, data_dir: str | None = None):
        if max_steps < 1:
            raise ValueError("max_steps must be >= 1")
        if page_size < 1:
            raise ValueError("page_size must be >= 1")
        self.max_steps, self.page_size = max_steps, page_size
        self.n_products, self.catalogue_seed = n_products, catalogue_seed
        self.data_dir = str(data_dir) if data_dir is not None else None
        self.products, self.goals, self.by_asin, self.search, self.lexicon = _world(n_products, catalogue_seed, self.data_dir)
        self._task: Task | None = None
        self._done = True

    # ------------------------------------------------------------------ tasks
    def tasks(self, split: str, n: int, offset: int = 0) -> list[Task]:
        if self.goals is not None:
            split_seed(split, 0)  # validates the split name
            lo, hi = FILE_SPLITS[split]
            hi = len(self.goals) if hi is None else min(hi, len(self.goals))
            if lo + offset + n > hi:
                raise ValueError(f"split {split!r} of {self.data_dir} has {hi - lo} goals; asked for {offset}..{offset + n - 1}")
            return [Task(self.name, split, i, lo + i, self.goals[lo + i]["query"]) for i in range(offset, offset + n)]
        return [Task(self.name, split, i, split_seed(split, i), self._target(split_seed(split, i))["query"])
                for i in range(offset, offset + n)]

    def _target(self, seed: int) -> dict:
        return self.products[random.Random(seed).randrange(len(self.products))]

    def goal_of(self, task: Task) -> dict:
        if self.goals is not None:
            return self.goals[task.seed]
        rng = random.Random(task.seed)
        product = self.products[rng.randrange(len(self.products))]
        return make_goal(product, rng)

    # ------------------------------------------------------------------ pages
    def _render(self) -> tuple[str, list[str]]:
        """(observation text, clickables) of the current page; clickables are lowercase."""
        page = self._page
        if page == "search":
            return "WebShop" + SEP + "Search", []
        if page == "done":
            return SEP.join(["Thank you for shopping with us!", "Your score (min 0.0, max 1.0)",
                             f"{self._score:.4f}".rstrip("0").rstrip(".")]), []
        texts, clicks = [BACK_TO_SEARCH], [BACK_TO_SEARCH]
        if page == "results":
            n, at = len(self._hits), (self._results_page - 1) * self.page_size
            if self._results_page > 1:
                texts.append(PREV_PAGE), clicks.append(PREV_PAGE)
            texts.append(f"Page {self._results_page} (Total results: {n})")
            if at + self.page_size < n:
                texts.append(NEXT_PAGE), clicks.append(NEXT_PAGE)
            for asin in self._hits[at:at + self.page_size]:
                p = self.by_asin[asin]
                texts += [asin, p["Title"], p["Price"]]
                clicks.append(asin)
        else:
            p = self.by_asin[self._asin]
            texts.append(PREV_PAGE), clicks.append(PREV_PAGE)
            if page == "item":
                for name, values in p["options"].items():
                    texts.append(name)
                    for v in values:
                        texts.append(f"[clicked] {v}" if self._options.get(name) == v else v)
                        clicks.append(v)
                texts += [p["Title"], f"Price: {p['Price']}", f"Rating: {p['Rating']}", *SUB_PAGES, END_BUTTON]
                clicks += [*SUB_PAGES, END_BUTTON]
            elif page == "Description":
                texts.append(p["Description"])
            elif page == "Features":
                texts += p["BulletPoints"]
            else:
                for r in p["Reviews"]:
                    texts += [r["title"], f"{r['score']} stars", r["body"]]
        return SEP.join(texts), [c.lower() for c in clicks]

    def _refresh(self) -> None:
        self._text, self._clickables = self._render()
        if self._page == "search":
            self._admissible = [SEARCH_PLACEHOLDER]
        elif self._page == "done":
            self._admissible = []
        else:
            # Product ids as the page shows them (clicks match case-insensitively): a cloned agent
            # then copies the id next to the title it chose, instead of also lower-casing 10
            # random characters, which a tiny model did not learn (0 valid product clicks).
            self._admissible = [f"click[{c.upper()}]" if c.upper() in self.by_asin else f"click[{c}]"
                                for c in self._clickables]

    @property
    def step_type(self) -> str:
        """Type of the upcoming step: a query on the search page, a click anywhere else."""
        return "search" if self._page == "search" else "click"

    # ------------------------------------------------------------------ episode
    def reset(self, task: Task) -> Observation:
        self._task, self._goal = task, self.goal_of(task)
        self._page, self._hits, self._results_page = "search", [], 1
        self._asin, self._options, self._query = None, {}, ""
        self._steps, self._done, self._won, self._score = 0, False, False, 0.0
        self._opened: set[str] = set()  # products whose item page this episode has shown
        self._refresh()
        return Observation(text=self._text, goal=self._goal["instruction_text"], admissible=list(self._admissible),
                           info={"task_type": self._goal["query"], "target": self._goal["asin"],
                                 "max_steps": self.max_steps, "task_key": task.key, "next_step_type": self.step_type})

    def step(self, action: str) -> Transition:
        if self._task is None:
            raise RuntimeError("ShopEnv.step called before reset()")
        if self._done:
            raise RuntimeError("ShopEnv.step called after the episode ended; call reset() first")
        step_type = self.step_type
        self._steps += 1
        valid = self._apply(action) if isinstance(action, str) else False
        self._refresh()
        self._done = self._page == "done" or self._steps >= self.max_steps
        return Transition(text=self._text, admissible=list(self._admissible), done=self._done, won=self._won,
                          score=self._score, valid=valid,
                          info={"step_type": step_type, "next_step_type": self.step_type, "page": self._page,
                                "steps": self._steps, "task_type": self._goal["query"]})

    def _apply(self, action: str) -> bool:
        """Apply a well-formed, admissible action; anything else leaves the page as it is."""
        name, arg = parse_action(action)
        if name == "search":
            if self._page != "search" or not arg or arg.lower() == "<your query>":
                return False
            self._query = arg.lower()
            self._hits, self._results_page, self._page = self.search(self._query), 1, "results"
            return True
        if name != "click" or not arg or arg.lower() not in self._clickables:
            return False
        c = arg.lower()
        if c == BACK_TO_SEARCH.lower():
            self._page, self._asin, self._options = "search", None, {}
        elif c == NEXT_PAGE.lower():
            self._results_page += 1
        elif c == PREV_PAGE.lower():
            if self._page == "results":
                self._results_page -= 1
            elif self._page == "item":
                self._page, self._asin, self._options = "results", None, {}
            else:
                self._page = "item"
        elif c == END_BUTTON.lower():
            p = self.by_asin[self._asin]
            self._reward = reward(p, self._goal, p["pricing"][0], self._options, self.lexicon)
            self._score = self._reward["score"]
            self._won = self._score >= 1.0 - 1e-9
            self._page = "done"
        elif c in (s.lower() for s in SUB_PAGES):
            self._page = next(s for s in SUB_PAGES if s.lower() == c)
        elif self._page == "results":
            self._asin, self._options, self._page = c.upper(), {}, "item"
            self._opened.add(self._asin)
        else:  # an option value on the item page
            p = self.by_asin[self._asin]
            opt = next(k for k, vals in p["options"].items() if c in vals)
            self._options[opt] = c
        return True

    # ------------------------------------------------------------------ expert
    def fits(self, asin: str) -> bool:
        """Buying `asin` with the goal's option values scores 1 (the expert's privileged check)."""
        p = self.by_asin[asin]
        want = self._goal["goal_options"]
        want = want if isinstance(want, dict) else {}
        chosen = {k: v for k, v in want.items() if v in p["options"].get(k, [])}
        if len(chosen) != len(want):
            return False
        return reward(p, self._goal, p["pricing"][0], chosen, self.lexicon)["score"] >= 1.0 - 1e-9

    def shows_fit(self, asin: str) -> bool:
        """What a results page shows of a product fits the goal: every goal attribute and the
        product type in its title, its price within the bound. The options are not shown there."""
        p, g = self.by_asin[asin], self._goal
        title = p["Title"].lower()
        return (all(a.lower() in title for a in g["attributes"]) and tokens(g["query"]) <= tokens(title)
                and p["pricing"][0] <= g["price_upper"])

    def _candidate(self, asin: str) -> bool:
        """A result the expert would still open: its title and price fit, and it was not opened and
        found to lack the goal's options."""
        return self.shows_fit(asin) and (asin not in self._opened or self.fits(asin))

    def expert_action(self) -> str:
        """An expert that acts on what the pages show, so a cloned agent can learn its choices:
        search the goal's attributes and type; on a results page open the first product whose title
        and price fit and that it has not rejected, else the next page; on an item page buy with the
        goal's option values if they are offered (`fits`, all visible there), else go back and
        remember the product as rejected; past the last page, search again. Only a search after the
        goal's query has no fitting result left uses the target's title (privileged, rare)."""
        if self._task is None or self._done:
            raise RuntimeError("ShopEnv.expert_action needs a running episode (reset first)")
        page = self._page
        if page == "search":
            query = self._goal["search_query"].lower()
            exhausted = self._query == query and not any(map(self._candidate, self._hits))
            return f"search[{self.by_asin[self._goal['asin']]['Title'].lower() if exhausted else query}]"
        if page in SUB_PAGES:
            return f"click[{PREV_PAGE.lower()}]"
        if page == "results":
            at = (self._results_page - 1) * self.page_size
            shown = self._hits[at:at + self.page_size]
            hit = next(filter(self._candidate, shown), None)
            if hit is not None:
                return f"click[{hit}]"
            if at + self.page_size < len(self._hits):
                return f"click[{NEXT_PAGE.lower()}]"
            return f"click[{BACK_TO_SEARCH.lower()}]"
        # item page
        if not self.fits(self._asin):
            return f"click[{PREV_PAGE.lower()}]"
        for k, v in sorted(self._goal["goal_options"].items()):
            if self._options.get(k) != v:
                return f"click[{v}]"
        return f"click[{END_BUTTON.lower()}]"
