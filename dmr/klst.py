"""KL-ST: train the router on KL-derived labels (paper Sec. 4.2, Eq. 6).

Each router-eligible step of the bf16 training pool is one example: the frozen-encoder embeddings
of the episode's steps up to it (the last `window` of them) and the label y = 1[KL > tau], where 1
means "needs the high precision" (class 0, the router's first precision). The loss is cross-entropy
with class weights inversely proportional to class frequency, w_c = N / (C * n_c), because positives
are rare by construction. Episodes, not steps, are split into train and validation, so no episode
leaks across; the checkpoint kept is the epoch with the best validation balanced accuracy.

`--dagger` adds the states the router meets when it routes (DAgger, beyond the paper): routed runs
of other training tasks with each step's true KL measured (dmr.agent --probe-kl). The bf16 pool
only holds states bf16 reaches; a routed agent that took a wrong low-precision action is somewhere
bf16 never goes, and a router trained on bf16 states alone scores those states by their surface
(late, "Nothing happens.") and spends its budget there. The same tau labels them.

More than one low precision (`--precisions bf16 LOW_1 .. LOW_L`, ordered by falling cost, with one
KL pool and one threshold.json per low precision, in that order): the pools score the same bf16
rollout and are joined on (task, step); a step's class is the cheapest low precision whose KL stays
at or below its own tau, else bf16 (dmr.labels.precision_labels), and the same class-weighted CE
runs over all L + 1 classes. DAgger and the single-pool tau options (--sweep, --tau-point,
--label-set) are two-precision only.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from dmr.labels import precision_labels
from dmr.router import (ENCODER_QUANTS, ENCODERS, PROPOSAL, ProposalEncoder, Router, RouterNet, StepEncoder, pad_windows,
                        param_count)
from dmr.routing import replay_contexts, step_text


def class_weights(labels, n_classes: int = 2) -> torch.Tensor:
    """w_c = N / (C * n_c): inversely proportional to the class frequency, 1 when balanced. A class
    absent from the data gets weight 0 (it has no examples to weigh)."""
    counts = torch.bincount(torch.as_tensor(labels, dtype=torch.long), minlength=n_classes).float()
    n = counts.sum()
    return torch.where(counts > 0, n / (n_classes * counts.clamp(min=1)), torch.zeros_like(counts))


def balanced_accuracy(pred, target, n_classes: int = 2) -> float:
    """Mean per-class recall over the classes present in `target`."""
    pred, target = np.asarray(pred), np.asarray(target)
    recalls = [float((pred[target == c] == c).mean()) for c in range(n_classes) if (target == c).any()]
    return float(np.mean(recalls)) if recalls else float("nan")


def step_texts(df) -> list[str]:
    """The router's text of every row of a steps table (sorted by task, step)."""
    return [step_text(r["step"], r["goal"], r["prev_action"] or "", r["observation"])
            for r in df.select("step", "goal", "prev_action", "observation").iter_rows(named=True)]


def proposal_features(encoder: ProposalEncoder, rollout: Path, df, batch: int = 16, progress: bool = True) -> torch.Tensor:
    """The proposal encoder's embedding of every row of a steps table (sorted by task, step): the
    rollout's episodes replayed `batch` at a time, the low model proposing at each step as it would
    have in the agent's place (its prompt holds the bf16 history up to the step)."""
    import polars as pl

    tasks = df["task"].unique().to_list()
    steps = pl.read_parquet(rollout / "steps.parquet").filter(pl.col("task").is_in(tasks))
    eps = replay_contexts(steps, pl.read_parquet(rollout / "episodes.parquet"))
    rows: dict = {}
    bar = tqdm(total=steps.height, desc="proposal encoder", disable=not progress)
    for k in range(0, len(eps), batch):
        group = eps[k:k + batch]
        for t in range(max(len(ctx) for ctx in group)):
            ctxs = [ctx[t] for ctx in group if t < len(ctx)]
            rows.update(((c.episode, c.step), row) for c, row in zip(ctxs, encoder.embed(ctxs)))
            bar.update(len(ctxs))
        for ctx in group:
            encoder.backend.end_session(ctx[0].episode)
    bar.close()
    keys = list(zip(df["task"].to_list(), df["step"].to_list()))
    missing = [k for k in keys if k not in rows]
    if missing:
        raise SystemExit(f"{rollout}: {len(missing)} steps of the KL table are not in the rollout (e.g. {missing[0]})")
    return torch.stack([rows[k] for k in keys])


def dagger_table(run: Path):
    """A routed probe run (dmr.agent --probe-kl) as a KL table: every step, its measured true KL as
    `kl` (null where the probe measured none) and the columns the text encoder reads."""
    import polars as pl

    steps = pl.read_parquet(run / "steps.parquet")
    if "true_kl" not in steps.columns or steps["true_kl"].drop_nulls().len() == 0:
        raise SystemExit(f"--dagger {run}: no measured true_kl (route it with dmr.agent --probe-kl)")
    goals = pl.read_parquet(run / "episodes.parquet").select("task", "goal")
    return (steps.join(goals, on="task", how="left")
            .select("task", "step", "step_type", pl.col("true_kl").cast(pl.Float64).alias("kl"), "goal",
                    "prev_action", "observation")
            .sort("task", "step"))


def features(encoder, kind: str, rollout: Path | None, df, progress: bool = True) -> torch.Tensor:
    """The step encoder's embedding of every row of a steps table (sorted by task, step)."""
    if kind == PROPOSAL:
        return proposal_features(encoder, rollout, df, progress=progress)
    texts = step_texts(df)
    uniq = list(dict.fromkeys(texts))
    where = {t: i for i, t in enumerate(uniq)}
    return encoder.encode(uniq, progress=progress)[[where[t] for t in texts]]


def windows(df, window: int, eligible: list[str], kl: tuple = ("kl",)) -> tuple[list[list[int]], list[int]]:
    """For each eligible row with a KL (in every column of `kl`): the row indices of its episode's
    last `window` steps up to it."""
    tasks, types = df["task"].to_list(), df["step_type"].to_list()
    # A DAgger run's steps without a measured KL (dagger_table) are context, not examples.
    labelled = [True] * len(tasks)
    for col in kl:
        if col in df.columns:
            labelled = [a and b for a, b in zip(labelled, df[col].is_not_null().to_list())]
    out, rows, start = [], [], 0
    for r in range(len(tasks)):
        if r and tasks[r] != tasks[r - 1]:
            start = r
        if types[r] in eligible and labelled[r]:
            out.append(list(range(max(start, r - window + 1), r + 1)))
            rows.append(r)
    return out, rows


def batch(emb: torch.Tensor, wins: list[list[int]], idx) -> tuple[torch.Tensor, torch.Tensor]:
    return pad_windows([emb[wins[i]] for i in idx], max(len(wins[i]) for i in idx))


@torch.inference_mode()
def predict(net, emb, wins, bs: int = 256) -> torch.Tensor:
    """Softmax over the precisions for every window."""
    net.eval()
    out = []
    order = sorted(range(len(wins)), key=lambda i: len(wins[i]))  # similar lengths pad less
    for k in range(0, len(order), bs):
        idx = order[k:k + bs]
        out.append((idx, net.probs(*batch(emb, wins, idx))))
    probs = torch.zeros((len(wins), net.n_classes))
    for idx, p in out:
        probs[idx] = p
    return probs


def train(net, emb, wins, y, train_idx, val_idx, epochs: int, bs: int, lr: float, seed: int,
          max_minutes: float | None = None, progress: bool = True) -> dict:
    """Class-weighted CE; keeps the state of the epoch with the best validation balanced accuracy."""
    g = random.Random(seed)
    torch.manual_seed(seed)
    y = torch.as_tensor(y, dtype=torch.long)
    weights = class_weights(y[train_idx], net.n_classes)
    loss_fn = torch.nn.CrossEntropyLoss(weight=weights)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.01)
    steps = epochs * math.ceil(len(train_idx) / bs)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(1, steps), pct_start=0.1)
    best = {"val_bacc": -1.0}
    history = []
    t0 = time.time()
    bar = tqdm(range(epochs), desc="klst", disable=not progress)
    for epoch in bar:
        net.train()
        order = list(train_idx)
        g.shuffle(order)
        # Batches of similar window lengths pad (and compute) far less; their order stays random.
        batches = []
        for c in range(0, len(order), 32 * bs):
            chunk = sorted(order[c:c + 32 * bs], key=lambda i: len(wins[i]))
            batches += [chunk[k:k + bs] for k in range(0, len(chunk), bs)]
        g.shuffle(batches)
        total = 0.0
        for idx in batches:
            x, valid = batch(emb, wins, idx)
            loss = loss_fn(net(x, valid), y[idx])
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        pred_val = predict(net, emb, [wins[i] for i in val_idx]).argmax(-1) if len(val_idx) else torch.zeros(0)
        bacc = balanced_accuracy(pred_val, y[val_idx], net.n_classes) if len(val_idx) else float("nan")
        history.append({"epoch": epoch, "train_loss": total / max(1, len(order)), "val_bacc": bacc})
        bar.set_postfix(loss=f"{total / max(1, len(order)):.3f}", val_bacc=f"{bacc:.3f}")
        if not (bacc <= best["val_bacc"]):  # also takes the first epoch when bacc is nan
            best = {"val_bacc": bacc, "epoch": epoch, "state": {k: v.clone() for k, v in net.state_dict().items()}}
        if max_minutes and time.time() - t0 > 60 * max_minutes and epoch + 1 < epochs:
            # A safety net, not a stopping rule: epochs decide; a cut run says so and records it.
            print(f"WARNING: KL-ST training cut by its {max_minutes}-minute safety cap after epoch {epoch + 1} "
                  f"of {epochs}; this router is not the recipe's (raise max_minutes or free the machine)",
                  file=sys.stderr)
            capped = True
            break
    else:
        capped = False
    net.load_state_dict(best.pop("state"))
    return {**best, "class_weights": weights.tolist(), "history": history, "capped": capped,
            "minutes": (time.time() - t0) / 60}


def join_pools(paths: list[Path], lows: list[str]):
    """The KL pools of the low precisions (one dmr.kl steps.parquet each, in `lows` order) as one table
    sorted by (task, step), each pool's KL as `kl_{low}`. They must score the same bf16 rollout: the
    same (task, step) keys with the same step type and router text, else the labels would join
    different states."""
    import polars as pl

    keys, text = ["task", "step"], ["step_type", "goal", "prev_action", "observation"]
    pools = [pl.read_parquet(p).sort(keys) for p in paths]
    for p, df in zip(paths, pools):
        missing = [c for c in keys + text + ["kl"] if c not in df.columns]
        if missing:
            raise SystemExit(f"{p}: no columns {missing} (a steps.parquet written by dmr.kl?)")
        if df.select(keys).is_duplicated().any():
            raise SystemExit(f"{p}: repeated (task, step) rows")
    out = pools[0].select(keys + text + [pl.col("kl").alias(f"kl_{lows[0]}")])
    for p, q, df in zip(paths[1:], lows[1:], pools[1:]):
        only = out.join(df, on=keys, how="anti").height, df.join(out, on=keys, how="anti").height
        if any(only):
            raise SystemExit(f"{paths[0]} and {p} are not KL pools of the same bf16 rollout: {only[0]} steps only "
                             f"in the first, {only[1]} only in the second")
        both = out.join(df.select(keys + text + ["kl"]), on=keys, suffix="_other")
        differ = both.filter(pl.any_horizontal([pl.col(c).ne_missing(pl.col(f"{c}_other")) for c in text]))
        if differ.height:
            r = differ.row(0, named=True)
            raise SystemExit(f"{paths[0]} and {p} are not KL pools of the same bf16 rollout: {differ.height} steps "
                             f"differ in {text} (e.g. task {r['task']!r} step {r['step']})")
        out = out.join(df.select(keys + [pl.col("kl").alias(f"kl_{q}")]), on=keys, how="left")
    return out.sort(keys)


def llm_params(model_dir: str) -> int | None:
    """Parameter count of a (possibly compressed) HF checkpoint, from its safetensors headers."""
    from safetensors import safe_open

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        return None
    n = 0
    for f in files:
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                n += math.prod(st.get_slice(k).get_shape())
    return n


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kl", required=True, type=Path, nargs="+",
                   help="steps.parquet written by dmr.kl: one per low precision, in --precisions order")
    p.add_argument("--threshold", required=True, type=Path, nargs="+",
                   help="threshold.json written by dmr.threshold: one per --kl pool")
    p.add_argument("--tau", type=float, nargs="+", default=None,
                   help="override the threshold files' tau, one per pool (sensitivity study)")
    p.add_argument("--sweep", type=Path, default=None, help="sweep.parquet written by dmr.threshold")
    p.add_argument("--tau-point", default=None, help="label with the tau of this named point of --sweep (e.g. dense)")
    p.add_argument("--labels-summary", type=Path, default=None,
                   help="labels.json written by dmr.labels: with --label-set, label with that set's tau")
    p.add_argument("--label-set", choices=("ao", "as"), default=None,
                   help="ao: tau placed on the action steps; as: on all steps (the Table 5 ablation)")
    p.add_argument("--precisions", nargs="+", required=True,
                   help="high first, then by falling cost, e.g. bf16 gptq_w4a16 (or bf16,gptq_w4a16,gptq_w3a16)")
    p.add_argument("--llm", default=None, help="the routed bf16 checkpoint, to report the router's relative size")
    p.add_argument("--step-types", nargs="+", default=["action"],
                   help="router-eligible step types; 'all' = every type in the KL table (the all-step ablation)")
    p.add_argument("--arch", type=json.loads, default={},
                   help="JSON RouterNet kwargs (layers, d_model, heads, ff, window, dropout, positions) and the "
                        "step encoder: encoder 'text' (the paper's sentence encoder) or 'proposal' (the low model's "
                        "proposal, dmr.router.ProposalEncoder; needs --rollout and --low), and encoder_quant, the text "
                        f"encoder's arithmetic {ENCODER_QUANTS} (none: fp32; recorded in router.json for deployment)")
    p.add_argument("--rollout", type=Path, default=None,
                   help="proposal encoder: the bf16 rollout the KL table was scored on (dmr.kl --rollout)")
    p.add_argument("--low", default=None, help="proposal encoder: the low-precision checkpoint")
    p.add_argument("--backend-kwargs", default=None,
                   help="proposal encoder: JSON keyword arguments of the HF backend (default: the rollout's, so the "
                        "features are computed as the routed runs of the cell will compute them)")
    p.add_argument("--dagger", nargs="+", type=Path, default=[],
                   help="routed probe runs (dmr.agent --probe-kl) of other training tasks: their states join the "
                        "training set, labelled by their measured true KL with the same tau (DAgger)")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--val-fraction", type=float, default=0.15)
    p.add_argument("--max-minutes", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, type=Path, help="router directory")
    p.add_argument("--quiet", action="store_true")
    train_router(**vars(p.parse_args(argv)))


def train_router(*, kl: list[Path], threshold: list[Path], tau: list[float] | None, sweep: Path | None,
                 tau_point: str | None, labels_summary: Path | None, label_set: str | None, precisions: list[str],
                 llm: str | None,
                 step_types: list[str], arch: dict, rollout: Path | None, low: str | None, backend_kwargs: str | None,
                 dagger: list[Path], epochs: int, batch_size: int, lr: float, val_fraction: float,
                 max_minutes: float | None, seed: int, out: Path, quiet: bool) -> None:
    """Train a KL-ST router on the KL tables `kl` (one per low precision) into `out` (arguments as
    main's flags of the same names; `backend_kwargs` is JSON)."""
    import polars as pl

    precisions = [q for x in precisions for q in x.split(",") if q]
    lows = precisions[1:]
    if not lows or len(set(precisions)) != len(precisions):
        raise SystemExit(f"--precisions {precisions}: give bf16 and at least one low precision, each once")
    if len(kl) != len(lows) or len(threshold) != len(lows) or (tau is not None and len(tau) != len(lows)):
        got = f"{len(kl)} --kl, {len(threshold)} --threshold" + ("" if tau is None else f", {len(tau)} --tau")
        raise SystemExit(f"{len(lows)} low precisions {lows}: give one --kl pool and one --threshold file (and "
                         f"--tau value) for each, in that order; got {got}")
    if len(lows) > 1:
        given = [name for name, v in (("--sweep", sweep), ("--tau-point", tau_point),
                                      ("--labels-summary", labels_summary), ("--label-set", label_set),
                                      ("--dagger", dagger)) if v]
        if given:
            raise SystemExit(f"{' '.join(given)}: two-precision options (one KL pool); with {len(lows)} low "
                             "precisions give each pool's tau by its --threshold file or --tau")
        taus = tau if tau is not None else [json.loads(t.read_text())["tau"] for t in threshold]
        df = join_pools(kl, lows)
        kl_cols = [f"kl_{q}" for q in lows]
    else:
        kl, threshold = kl[0], threshold[0]
        df, kl_cols = None, ["kl"]
        taus = [tau[0] if tau is not None else json.loads(threshold.read_text())["tau"]]
    tau = taus[0]
    if tau_point:
        if sweep is None:
            raise SystemExit("--tau-point needs --sweep (the sweep.parquet of dmr.threshold)")
        points = dict(pl.read_parquet(sweep).select("name", "tau").iter_rows())
        if tau_point not in points:
            raise SystemExit(f"--tau-point {tau_point!r}: {sweep} has the points {sorted(points)}")
        tau = points[tau_point]
    if label_set:
        if labels_summary is None:
            raise SystemExit("--label-set needs --labels-summary (the labels.json of dmr.labels)")
        tau = json.loads(labels_summary.read_text())[label_set]["tau"]
    if df is None:
        df, taus = pl.read_parquet(kl).sort("task", "step"), [tau]
    if step_types == ["all"]:
        step_types = sorted(df["step_type"].unique().to_list())
    arch = dict(arch)
    kind = arch.pop("encoder", "text")
    if kind not in ENCODERS:
        raise SystemExit(f"--arch encoder {kind!r}: expected one of {ENCODERS}")
    # The text encoder's arithmetic; a proposal router has no sentence encoder, so it does not apply
    # (route.router.encoder_quant stays set for the text routers of an encoder ablation).
    quant = arch.pop("encoder_quant", "none")
    if quant not in ENCODER_QUANTS:
        raise SystemExit(f"--arch encoder_quant {quant!r}: expected one of {ENCODER_QUANTS}")
    if kind == PROPOSAL:
        if rollout is None or low is None:
            raise SystemExit("the proposal encoder needs --rollout (the KL table's bf16 rollout) and --low (the checkpoint)")
        from dmr import prompts
        from dmr.llm import load
        from dmr.llm.base import Sampling

        spec = json.loads((rollout / "spec.json").read_text())
        style = prompts.get(**spec["agent"]["prompt"])
        ag = spec["agent"]
        sampling = Sampling(ag["max_new_tokens"], ag["temperature"], ag["top_p"], seed=ag["seed"], stop=style.stop)
        kwargs = json.loads(backend_kwargs) if backend_kwargs else spec.get("backend_kwargs", {})
        encoder = ProposalEncoder(load("hf", low, **kwargs), style, sampling, ag.get("constrained", False),
                                  precision=precisions[1])
    else:
        encoder = StepEncoder(quant=quant)
    cols = ["task", "step", "step_type", *kl_cols, "goal", "prev_action", "observation"]
    df = df.select(cols).with_columns(source=pl.lit("pool"))
    emb = features(encoder, kind, rollout, df, not quiet)
    for run in dagger:
        extra = dagger_table(run)
        clash = set(extra["task"].unique()) & set(df["task"].unique())
        if clash:
            raise SystemExit(f"--dagger {run}: its tasks must not be the KL pool's or another run's "
                             f"(e.g. {sorted(clash)[0]}); route other training tasks")
        emb = torch.cat([emb, features(encoder, kind, run, extra, not quiet)])
        df = pl.concat([df, extra.with_columns(source=pl.lit(f"dagger:{run}"))])
    arch = {"n_classes": len(precisions), "in_dim": encoder.dim, **arch}
    torch.manual_seed(seed)  # the initial weights, not whatever loading the encoder left in the global RNG
    net = RouterNet(**arch)
    window = net.window
    wins, rows = windows(df, window, step_types, tuple(kl_cols))
    if not rows:
        raise SystemExit(f"{kl}: no steps of type {step_types}")
    step_kl = np.stack([df[c].to_numpy()[rows] for c in kl_cols], axis=1)
    # Class 0 = bf16: no low precision's KL at or below its tau (two precisions: KL above tau).
    y = precision_labels(step_kl, taus).tolist()
    tasks = df["task"].to_numpy()[rows]
    source = df["source"].to_numpy()[rows]
    # The pool's validation episodes do not depend on --dagger (ablations and diagnostics compare
    # routers on them); each DAgger run holds out the same fraction of its own episodes.
    val_eps, episodes = set(), []
    for src in dict.fromkeys(source):
        eps = sorted(set(tasks[source == src]))
        random.Random(seed).shuffle(eps)
        val_eps |= set(eps[:int(round(val_fraction * len(eps)))])
        episodes += eps
    train_idx = [i for i, t in enumerate(tasks) if t not in val_eps]
    val_idx = [i for i, t in enumerate(tasks) if t in val_eps]
    fit = train(net, emb, wins, y, train_idx, val_idx, epochs, batch_size, lr, seed, max_minutes, not quiet)
    probs = predict(net, emb, wins)
    pred = probs.argmax(-1).numpy()
    yy = np.asarray(y)
    split = np.array(["val" if t in val_eps else "train" for t in tasks])
    router = Router(net, encoder, precisions, threshold=0.5, eligible=tuple(step_types))
    out.mkdir(parents=True, exist_ok=True)
    router.save(out, {"low": low} if kind == PROPOSAL else None)
    n_llm = llm_params(llm) if llm else None
    n_router = param_count(net)
    # The proposal encoder is the low model the run serves anyway: no parameters of its own.
    n_encoder = 0 if kind == PROPOSAL else sum(p.numel() for p in encoder.model.parameters())
    C = len(precisions)
    # Two precisions: `tau`; more: `taus` and each precision's share of the labels.
    taus_ = {"tau": tau} if C == 2 else {"taus": dict(zip(lows, taus))}
    shares = {} if C == 2 else {"class_fractions": {q: float((yy == c).mean()) for c, q in enumerate(precisions)}}
    metrics = {
        **taus_, "steps": len(rows), "episodes": len(episodes), "positive_fraction": float((yy == 0).mean()), **shares,
        "train_bacc": balanced_accuracy(pred[split == "train"], yy[split == "train"], C),
        "val_bacc": balanced_accuracy(pred[split == "val"], yy[split == "val"], C),
        "val_bacc_pool": balanced_accuracy(pred[(split == "val") & (source == "pool")],
                                           yy[(split == "val") & (source == "pool")], C),
        "dagger": {str(r): int((source == f"dagger:{r}").sum()) for r in dagger},
        "best_epoch": fit["epoch"], "class_weights": fit["class_weights"], "history": fit["history"],
        "minutes": fit["minutes"], "capped": fit["capped"], "arch": arch, "encoder": kind,
        "encoder_quant": "none" if kind == PROPOSAL else quant,
        "params": {"router": n_router, "encoder": n_encoder, "llm": n_llm,
                   "router_vs_llm": n_router / n_llm if n_llm else None,
                   "router_and_encoder_vs_llm": (n_router + n_encoder) / n_llm if n_llm else None}}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    # `label` is 1 where the step needs bf16 and `score` is p_bf16 whatever the number of precisions;
    # with more, each pool's KL, the class (`target`, an index into precisions) and every probability.
    kls = {"kl": step_kl[:, 0]} if C == 2 else {c: step_kl[:, j] for j, c in enumerate(kl_cols)}
    more = {} if C == 2 else {"target": yy, **{f"prob_{q}": probs[:, c].numpy() for c, q in enumerate(precisions)}}
    pl.DataFrame({"task": df["task"].to_numpy()[rows], "step": df["step"].to_numpy()[rows],
                  "step_type": df["step_type"].to_numpy()[rows], **kls,
                  "label": (yy == 0).astype(int), "score": probs[:, 0].numpy(), **more, "split": split,
                  "source": source}).write_parquet(out / "train_scores.parquet")
    rel = f"{100 * metrics['params']['router_vs_llm']:.0f}% of the LLM" if n_llm else "LLM size unknown"
    labels = (f"tau {tau:.3e}, {100 * metrics['positive_fraction']:.1f}% positive" if C == 2 else
              "taus " + ", ".join(f"{q} {t:.3e}" for q, t in zip(lows, taus)) + "; classes " +
              ", ".join(f"{q} {100 * f:.1f}%" for q, f in metrics["class_fractions"].items()))
    print(f"router: {n_router:,} parameters ({rel}; frozen encoder {n_encoder:,}); {labels}; balanced accuracy "
          f"train {metrics['train_bacc']:.3f}, val {metrics['val_bacc']:.3f} (epoch {fit['epoch']}) -> {out}")


if __name__ == "__main__":
    main()
