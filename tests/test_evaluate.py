"""Evaluation tables: success and episode time of successful episodes over seeds, speedup vs Full."""
from __future__ import annotations

import polars as pl
import pytest

from dmr.evaluate import main, summarize


def write(path, won, time, high=None):
    n = len(won)
    pl.DataFrame({"task": [f"t{i}" for i in range(n)], "won": won, "score": [float(w) for w in won],
                  "steps": [10] * n, "time": time, "high_calls": high or [10] * n, "calls": [10] * n}).write_parquet(path)
    return path


def test_summarize_and_markdown(tmp_path):
    f0 = write(tmp_path / "f0.parquet", [True, True, False, False], [2.0, 4.0, 100.0, 100.0])
    f1 = write(tmp_path / "f1.parquet", [True, False, False, False], [6.0, 100.0, 100.0, 100.0])
    q0 = write(tmp_path / "q0.parquet", [True, False, False, False], [1.0, 9.0, 9.0, 9.0], high=[0] * 4)
    q1 = write(tmp_path / "q1.parquet", [True, False, False, False], [2.0, 9.0, 9.0, 9.0], high=[0] * 4)
    df = summarize({"Full": [f0, f1], "w3/Quant": [q0, q1]}, "house/tiny")
    full, quant = df.row(0, named=True), df.row(1, named=True)
    assert full["success"] == pytest.approx(37.5) and full["success_std"] == pytest.approx(17.677, abs=1e-3)
    assert full["ep_time"] == pytest.approx((3.0 + 6.0) / 2)  # failures never count toward EP Time
    assert full["speedup"] == pytest.approx(1.0)
    assert quant["quant"] == "w3" and quant["method"] == "Quant" and quant["high_frac"] == 0
    assert quant["speedup"] == pytest.approx(4.5 / 1.5)
    main(["--cell", "house/tiny", "--method", "Full", str(f0), str(f1), "--method", "w3/Quant", str(q0), str(q1),
          "--out", str(tmp_path / "t.parquet"), "--markdown", str(tmp_path / "t.md")])
    md = (tmp_path / "t.md").read_text()
    assert "| bf16 | Full | – | 37.5 ± 17.7 |" in md and "| w3 | Quant | – | 25.0 ± 0.0 |" in md and "3.00x" in md


def test_method_that_won_on_one_seed_only(tmp_path):
    # A badly degraded scheme may win a task on one seed and none on the others: its EP time then
    # comes from that seed alone and has no spread; the table must still be written.
    f = write(tmp_path / "f.parquet", [True, True], [4.0, 4.0])
    q0 = write(tmp_path / "q0.parquet", [False, False], [9.0, 9.0], high=[0, 0])
    q1 = write(tmp_path / "q1.parquet", [True, False], [2.0, 9.0], high=[0, 0])
    main(["--cell", "house/tiny", "--method", "Full", str(f), str(f), "--method", "w2/Quant", str(q0), str(q1),
          "--out", str(tmp_path / "t.parquet"), "--markdown", str(tmp_path / "t.md")])
    md = (tmp_path / "t.md").read_text()
    assert "| w2 | Quant | – | 25.0 ± 35.4 | 10.0 ± 0.0 | 2.00 | 2.00x |" in md


def test_routed_methods_latex_and_pareto(tmp_path):
    f = write(tmp_path / "f.parquet", [True, True], [4.0, 4.0])
    q = write(tmp_path / "q.parquet", [True, False], [2.0, 9.0], high=[0, 0])
    d = write(tmp_path / "d.parquet", [True, True], [3.0, 3.0], high=[4, 4])
    main(["--cell", "house/tiny", "--method", "Full", str(f), "--method", "w3/Quant", str(q),
          "--method", "w3/DMR@0.4", str(d), "--out", str(tmp_path / "t.parquet"), "--markdown", str(tmp_path / "t.md"),
          "--latex", str(tmp_path / "t.tex"), "--pareto", str(tmp_path / "p.png")])
    df = pl.read_parquet(tmp_path / "t.parquet")
    row = df.filter(pl.col("method") == "DMR").row(0, named=True)
    assert row["budget"] == pytest.approx(0.4) and row["high_frac"] == pytest.approx(0.4)
    assert row["speedup"] == pytest.approx(4.0 / 3.0)
    tex = (tmp_path / "t.tex").read_text()
    assert r"\textbf{100.0 $\pm$ 0.0}" in tex and r"w3 & DMR & 0.4" in tex
    assert (tmp_path / "p.png").stat().st_size > 0 and (tmp_path / "p.pdf").exists()


def test_graded_benchmark_gets_a_score_column(tmp_path):
    f = tmp_path / "f.parquet"
    pl.DataFrame({"task": ["a", "b"], "won": [True, False], "score": [1.0, 0.5], "steps": [3, 4], "time": [1.0, 2.0],
                  "high_calls": [3, 4], "calls": [3, 4]}).write_parquet(f)
    main(["--cell", "shop/tiny", "--method", "Full", str(f), "--out", str(tmp_path / "t.parquet"),
          "--markdown", str(tmp_path / "t.md")])
    md = (tmp_path / "t.md").read_text()
    assert "| Score |" in md and "| 0.750 ± 0.000 |" in md


def test_modelled_time_uses_the_cost_model_and_names_the_coefficients(tmp_path):
    import json

    def eps(run, won, calls, high_tokens, tokens, decided=None, policy="full"):
        """A run directory: episodes, steps (`decided[i]` of episode i's steps with a route score) and spec."""
        run.mkdir()
        tasks = [f"t{i}" for i in range(len(won))]
        pl.DataFrame({"task": tasks, "won": won, "score": [float(w) for w in won],
                      "steps": calls, "time": [1.0] * len(won), "high_calls": [0] * len(won), "calls": calls,
                      "high_tokens": high_tokens, "tokens": tokens}).write_parquet(run / "episodes.parquet")
        decided = decided or [0] * len(won)
        # Each step writes tokens / steps tokens; the first steps, high_tokens of them, at bf16.
        per = [t // n for t, n in zip(tokens, calls)]
        pl.DataFrame({"task": [t for t, n in zip(tasks, calls) for _ in range(n)],
                      "step_type": ["action"] * sum(calls),
                      "precision": ["bf16" if j < h // k else "w3" for n, h, k in zip(calls, high_tokens, per)
                                    for j in range(n)],
                      "completion_tokens": [k for n, k in zip(calls, per) for _ in range(n)],
                      "route_score": [0.5 if j < d else None for n, d in zip(calls, decided) for j in range(n)]},
                     schema_overrides={"route_score": pl.Float64}).write_parquet(run / "steps.parquet")
        (run / "spec.json").write_text(json.dumps({"policy": policy}))
        return run / "episodes.parquet"

    coef = {"cell": "house/tiny", "source": "config", "high": "bf16", "quants": ["w3"], "projected": {},
            "per_token": {"bf16": 0.02, "w3": 0.01}, "router": 0.005, "t_ref": 1.0}
    (tmp_path / "c.json").write_text(json.dumps(coef))
    f = eps(tmp_path / "f", [True, False], [10, 10], [50, 50], [50, 50])
    # GRPO's first episode: 10 steps, 8 of them router-decided (2 forced to bf16).
    d = eps(tmp_path / "d", [True, True], [10, 4], [20, 0], [50, 20], decided=[8, 4], policy="grpo-k0.4")
    main(["--cell", "house/tiny", "--method", "Full", str(f), "--method", "w3/GRPO@0.4", str(d),
          "--out", str(tmp_path / "t.parquet"), "--markdown", str(tmp_path / "t.md"), "--latency", str(tmp_path / "c.json"),
          "--pareto", str(tmp_path / "p.png")])
    t = pl.read_parquet(tmp_path / "t.parquet")
    # Full: no router, 50 bf16 tokens = 1.0 s. GRPO: (8*0.005 + 20*0.02 + 30*0.01 + 4*0.005 + 20*0.01) / 2
    assert t["cost"].to_list() == pytest.approx([1.0, (0.74 + 0.22) / 2])
    # A random run recorded before random routing recorded its score: its router calls are unknown.
    r = eps(tmp_path / "r", [True], [3], [0], [30], policy="random-k0.4")
    with pytest.raises(ValueError, match="no route_score"):
        main(["--cell", "house/tiny", "--method", "w3/Random@0.4", str(r), "--out", str(tmp_path / "u.parquet"),
              "--markdown", str(tmp_path / "u.md"), "--latency", str(tmp_path / "c.json")])
    assert t["method"].to_list() == ["Full", "GRPO"] and (tmp_path / "p.png").exists()
    md = (tmp_path / "t.md").read_text()
    assert "Modelled time" in md and "given in the config" in md


def test_a_ladder_schemes_rows_carry_precision_shares_and_cost(tmp_path):
    """Table 1 of a three-precision scheme (w4+w2): each row's share of steps at every precision, Eq. 9
    with each precision's coefficient, the two-precision router at the same cost budget beside it
    (DMR-w4@0.8, paired with the scheme's matched random), and a Pareto panel on the modelled cost."""
    import json

    def run(d, precisions, won, policy):
        d.mkdir()
        tasks = [f"t{i}" for i in range(len(won))]
        pl.DataFrame({"task": tasks, "won": won, "score": [float(w) for w in won], "steps": [len(precisions)] * len(won),
                      "time": [1.0] * len(won), "high_calls": [precisions.count("bf16")] * len(won),
                      "calls": [len(precisions)] * len(won), "high_tokens": [10 * precisions.count("bf16")] * len(won),
                      "tokens": [10 * len(precisions)] * len(won)}).write_parquet(d / "episodes.parquet")
        pl.DataFrame({"task": [t for t in tasks for _ in precisions], "step_type": "action",
                      "precision": precisions * len(won), "completion_tokens": 10,
                      "route_score": 0.5}).write_parquet(d / "steps.parquet")
        (d / "spec.json").write_text(json.dumps({"policy": policy}))
        return str(d / "episodes.parquet")

    coef = {"cell": "house/tiny", "source": "config", "high": "bf16", "quants": ["w4", "w2"], "projected": {},
            "per_token": {"bf16": 0.02, "w4": 0.01, "w2": 0.005}, "router": 0.001, "t_ref": 1.0}
    (tmp_path / "c.json").write_text(json.dumps(coef))
    n = 40
    methods = {"Full": run(tmp_path / "f", ["bf16"] * 4, [True] * n, "full"),
               "w4+w2/DMR@0.8": run(tmp_path / "d", ["bf16", "w4", "w2", "w2"], [True] * 30 + [False] * 10, "dmr-k0.8"),
               "w4+w2/Random@0.8": run(tmp_path / "r", ["bf16", "w4", "w2", "w2"], [True] * 10 + [False] * 30,
                                       "random-k0.8"),
               "w4+w2/DMR-w4@0.8": run(tmp_path / "b", ["bf16", "w4", "w4", "w4"], [True] * 20 + [False] * 20, "dmr-c0.8"),
               # the better binary router (25 of 40 against DMR-w4's 20): the three-way one is paired with it
               "w4+w2/DMR-w2@0.8": run(tmp_path / "c", ["bf16", "bf16", "w2", "w2"], [False] * 5 + [True] * 25
                                       + [False] * 10, "dmr-c0.8")}
    args = [a for m, path in methods.items() for a in ("--method", m, path)]
    main(["--cell", "house/tiny", *args, "--out", str(tmp_path / "t.parquet"), "--markdown", str(tmp_path / "t.md"),
          "--latency", str(tmp_path / "c.json"), "--pareto", str(tmp_path / "p.png")])
    t = pl.read_parquet(tmp_path / "t.parquet")
    row = {r["method"]: r for r in t.iter_rows(named=True)}
    assert row["DMR"]["shares"] == "bf16 25% · w4 25% · w2 50%"
    assert row["DMR-w4"]["shares"] == "bf16 25% · w4 75% · w2 0%" and row["Full"]["shares"] is None
    # Eq. 9: 4 router calls + 10 tokens at each step's precision
    assert row["DMR"]["cost"] == pytest.approx(4 * 0.001 + 10 * (0.02 + 0.01 + 0.005 + 0.005))
    assert row["DMR-w4"]["cost"] == pytest.approx(4 * 0.001 + 10 * (0.02 + 3 * 0.01))
    assert row["DMR"]["vs_random"] == pytest.approx(50.0) and row["DMR-w4"]["vs_random"] == pytest.approx(25.0)
    # DMR wins tasks 0-29, DMR-w2 tasks 5-29: +5 of 40 tasks, paired, against the better binary router
    assert row["DMR"]["vs_binary_ref"] == "DMR-w2" and row["DMR"]["vs_binary"] == pytest.approx(12.5)
    assert row["DMR"]["vs_binary_lo"] > 0 and row["DMR"]["vs_binary_verdict"] == "win"
    assert row["DMR-w4"]["vs_binary"] is None and row["Random"]["vs_binary"] is None
    md = (tmp_path / "t.md").read_text()
    assert "precision shares" in md and "| bf16 25% · w4 25% · w2 50% |" in md and "share of bf16's modelled cost" in md
    assert (tmp_path / "p.png").exists()


def test_table_carries_paired_columns(tmp_path):
    n = 60
    f = write(tmp_path / "f.parquet", [True] * n, [4.0] * n)
    q = write(tmp_path / "q.parquet", [False] * n, [9.0] * n, high=[0] * n)
    d = write(tmp_path / "d.parquet", [True] * 45 + [False] * 15, [3.0] * n, high=[4] * n)
    r = write(tmp_path / "r.parquet", [True] * 15 + [False] * 45, [3.0] * n, high=[4] * n)
    main(["--cell", "house/tiny", "--method", "Full", str(f), "--method", "w2/Quant", str(q),
          "--method", "w2/DMR@0.4", str(d), "--method", "w2/Random@0.4", str(r),
          "--out", str(tmp_path / "t.parquet"), "--markdown", str(tmp_path / "t.md")])
    row = pl.read_parquet(tmp_path / "t.parquet").filter(pl.col("method") == "DMR").row(0, named=True)
    assert row["vs_random"] == pytest.approx(50.0) and row["vs_random_lo"] > 0 and row["vs_random_verdict"] == "win"
    assert row["recovered"] == pytest.approx(0.75)
    md = (tmp_path / "t.md").read_text()
    assert "Δ vs Random (95% CI)" in md and "| +50.0 [" in md and "win |" in md and "+75% [" in md


def test_wall_time_leaves_table_1_so_two_runs_write_it_byte_for_byte(tmp_path):
    """The same episodes measured at two wall-clock speeds: with --wall-time, Table 1's parquet, Markdown
    and LaTeX are byte-identical (modelled time and modelled speedup only); the wall-time table differs."""
    import json

    def run(d, won, time, precision, policy):
        d.mkdir(parents=True)
        tasks = [f"t{i}" for i in range(len(won))]
        pl.DataFrame({"task": tasks, "won": won, "score": [float(w) for w in won], "steps": [2] * len(won),
                      "time": time, "high_calls": [2 * (precision == "bf16")] * len(won), "calls": [2] * len(won),
                      "high_tokens": [20 * (precision == "bf16")] * len(won), "tokens": [20] * len(won)}
                     ).write_parquet(d / "episodes.parquet")
        pl.DataFrame({"task": [t for t in tasks for _ in range(2)], "step_type": "action", "precision": precision,
                      "completion_tokens": 10, "route_score": None},
                     schema_overrides={"route_score": pl.Float64}).write_parquet(d / "steps.parquet")
        (d / "spec.json").write_text(json.dumps({"policy": policy}))
        return str(d / "episodes.parquet")

    coef = {"cell": "house/tiny", "source": "config", "high": "bf16", "quants": ["w3"], "projected": {},
            "per_token": {"bf16": 0.02, "w3": 0.01}, "router": 0.005, "t_ref": 1.0}
    (tmp_path / "c.json").write_text(json.dumps(coef))
    outs = []
    for i, scale in enumerate((1.0, 1.7)):  # a second run on a slower machine: other wall times, same episodes
        f = run(tmp_path / f"{i}/f", [True, True, False], [2.0 * scale, 3.0 * scale, 9.0], "bf16", "full")
        q = run(tmp_path / f"{i}/q", [True, False, False], [1.5 * scale, 9.0, 9.0], "w3", "quant")
        o = tmp_path / f"{i}/tables"
        o.mkdir()
        main(["--cell", "house/tiny", "--method", "Full", f, "--method", "w3/Quant", q, "--latency", str(tmp_path / "c.json"),
              "--out", str(o / "main.parquet"), "--markdown", str(o / "main.md"), "--latex", str(o / "main.tex"),
              "--wall-time", str(o / "wall_time.parquet")])
        outs.append(o)
    for name in ("main.parquet", "main.md", "main.tex"):
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name
    assert (outs[0] / "wall_time.md").read_bytes() != (outs[1] / "wall_time.md").read_bytes()
    t, wall = pl.read_parquet(outs[0] / "main.parquet"), pl.read_parquet(outs[1] / "wall_time.parquet")
    assert "ep_time" not in t.columns and "speedup" not in t.columns
    # Full: 20 bf16 tokens = 0.4 s; Quant: 20 w3 tokens = 0.2 s, a modelled speedup of 2.
    assert t["cost"].to_list() == pytest.approx([0.4, 0.2]) and t["cost_speedup"].to_list() == pytest.approx([1.0, 2.0])
    assert wall["ep_time"].to_list() == pytest.approx([2.5 * 1.7, 1.5 * 1.7])
    assert wall["speedup"].to_list() == pytest.approx([1.0, 2.5 / 1.5])
    md = (outs[0] / "main.md").read_text()
    assert "EP Time" not in md.splitlines()[2] and "| Modelled speedup |" in md and "| 2.00x |" in md
    assert "| bf16 | Full | – | 2.50 ± 0.00 | 1.00x | 3 |" in (outs[0] / "wall_time.md").read_text()
    with pytest.raises(SystemExit, match="give --latency"):
        main(["--cell", "house/tiny", "--method", "Full", f, "--out", str(tmp_path / "x.parquet"),
              "--markdown", str(tmp_path / "x.md"), "--wall-time", str(tmp_path / "w.parquet")])


def test_forced_is_charged_no_router_call(tmp_path):
    """Forced is random:0 under the router steps: its click steps carry the random router's score 0.0,
    yet no router runs, so Eq. 9 charges its tokens only."""
    import json

    d = tmp_path / "forced"
    d.mkdir()
    pl.DataFrame({"task": ["t0"], "won": [True], "score": [1.0], "steps": [2], "time": [1.0], "high_calls": [1],
                  "calls": [2], "high_tokens": [10], "tokens": [20]}).write_parquet(d / "episodes.parquet")
    pl.DataFrame({"task": ["t0", "t0"], "step_type": ["search", "click"], "precision": ["bf16", "w2"],
                  "completion_tokens": [10, 10], "route_score": [None, 0.0]},
                 schema_overrides={"route_score": pl.Float64}).write_parquet(d / "steps.parquet")
    (d / "spec.json").write_text(json.dumps({"policy": "random:0", "routing": {"router_steps": ["click"]}}))
    coef = {"cell": "shop/tiny", "source": "config", "high": "bf16", "quants": ["w2"], "projected": {},
            "per_token": {"bf16": 0.02, "w2": 0.01}, "router": 0.5, "t_ref": 1.0}
    (tmp_path / "c.json").write_text(json.dumps(coef))
    for name, router in (("w2/Forced", 0.0), ("w2/Random@0.4", 0.5)):  # the same run, named as a random baseline
        t = summarize({name: [d / "episodes.parquet"]}, "shop/tiny", coef)
        assert t["cost"][0] == pytest.approx(10 * 0.02 + 10 * 0.01 + router), name
