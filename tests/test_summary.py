"""The results summary (dmr.summary): the claim table, per-rule timing and the critical path."""
from __future__ import annotations

import base64
import json

import polars as pl

from dmr import summary


def record(meta, output, rule, inputs, start, end, job):
    name = base64.urlsafe_b64encode(output.encode()).decode().rstrip("=")
    (meta / name).write_text(json.dumps({"rule": rule, "input": inputs, "starttime": start, "endtime": end,
                                         "job_hash": job, "incomplete": False}))


def test_critical_path_follows_the_longest_dependency_chain(tmp_path):
    meta = tmp_path / "metadata"
    meta.mkdir()
    record(meta, "a.txt", "quantize", ["ext"], 0, 60, 1)
    record(meta, "b.txt", "kl", ["a.txt"], 60, 180, 2)        # a -> b: 1 + 2 minutes
    record(meta, "c.txt", "rollout", ["a.txt"], 60, 660, 3)   # a -> c: 1 + 10 minutes, the longest
    record(meta, "c2.txt", "rollout", ["a.txt"], 60, 660, 3)  # a second output of the same job
    record(meta, "d.txt", "evaluate", ["b.txt", "c.txt"], 660, 720, 4)
    chain = summary.critical_path(meta)
    assert [c["rule"] for c in chain] == ["quantize", "rollout", "evaluate"]
    assert sum(c["minutes"] for c in chain) == 12
    assert "Critical path (12.0 minutes" in "\n".join(summary.critical_markdown(chain))
    assert summary.critical_path(tmp_path / "none") == []


def test_timing_sums_benchmark_files_per_rule(tmp_path):
    for rule, job, s in (("rollout", "a", 60.0), ("rollout", "b", 120.0), ("klst", "k", 30.0)):
        d = tmp_path / "household/tiny/benchmarks" / rule
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{job}.tsv").write_text(f"s\th:m:s\tmax_rss\n{s}\t0:01:00\t512.5\n")
    t = summary.timing(tmp_path)
    assert t["rule"].to_list() == ["rollout", "klst"] and t["jobs"].to_list() == [2, 1]
    assert t["minutes"].to_list() == [3.0, 0.5] and t["peak_rss_mb"].to_list() == [512.5, 512.5]


def test_claim_lists_every_routed_method_against_random():
    rows = [{"quant": "bf16", "method": "Full", "budget": None, "success": 95.0, "high_frac": 1.0},
            {"quant": "w2", "method": "Quant", "budget": None, "success": 35.0, "high_frac": 0.0}]
    for method, succ in (("DMR", 80.0), ("Random", 70.0), ("Oracle", 95.0)):
        rows.append({"quant": "w2", "method": method, "budget": 0.4, "success": succ, "high_frac": 0.4,
                     "vs_random": None if method == "Random" else succ - 70.0, "vs_random_lo": 1.0,
                     "vs_random_hi": 20.0, "vs_random_verdict": None if method == "Random" else "win",
                     "recovered": (succ - 35) / 60, "recovered_lo": 0.5, "recovered_hi": 0.9})
    text = "\n".join(summary.claim(pl.DataFrame(rows)))
    assert "| w2 | 0.4 | DMR | 80.0 | 70.0 | +10.0 [+1.0, +20.0] | win | +75% [+50, +90] | 40% |" in text
    assert "| w2 | 0.4 | Oracle | 95.0 |" in text and "Full 95.0%; Quant w2 35.0%." in text


def test_claim_pairs_routing_with_the_forced_rule_where_there_is_one():
    """A shop scheme with a Forced row: a Δ vs Forced column, and a line with Forced's own recovered share."""
    rows = [{"quant": "bf16", "method": "Full", "budget": None, "success": 15.0, "high_frac": 1.0},
            {"quant": "w2", "method": "Quant", "budget": None, "success": 0.3, "high_frac": 0.0},
            {"quant": "w2", "method": "Forced", "budget": None, "success": 8.7, "high_frac": 0.75,
             "recovered": 0.57, "recovered_lo": 0.36, "recovered_hi": 0.85},
            {"quant": "w2", "method": "DMR", "budget": 0.4, "success": 10.0, "high_frac": 0.8, "vs_random": -1.0,
             "vs_random_lo": -4.0, "vs_random_hi": 2.0, "vs_random_verdict": "tie", "recovered": 0.66,
             "recovered_lo": 0.4, "recovered_hi": 0.9, "vs_forced": 1.3, "vs_forced_lo": -1.7, "vs_forced_hi": 4.3,
             "vs_forced_verdict": "tie"}]
    text = "\n".join(summary.claim(pl.DataFrame(rows)))
    assert "| Δ vs Forced (95% CI) |" in text and "| 80% | +1.3 [-1.7, +4.3] tie |" in text
    assert "Forced (w2): 8.7%, recovering +57% [+36, +85] of the gap" in text
    assert "Δ vs Forced" not in "\n".join(summary.claim(pl.DataFrame(rows[:2] + [
        {k: v for k, v in rows[3].items() if not k.startswith("vs_forced")}])))


def test_three_precisions_section_sits_apart_from_the_binary_claim():
    """A ladder scheme's rows (w4+w2) go to their own section, with precision shares and modelled time;
    the binary claim table keeps to the two-precision schemes."""
    rows = [{"quant": "bf16", "method": "Full", "budget": None, "success": 95.0, "high_frac": 1.0, "cost": 2.0,
             "shares": None},
            {"quant": "w2", "method": "DMR", "budget": 0.4, "success": 80.0, "high_frac": 0.4, "cost": 1.7,
             "shares": None, "vs_random": 5.0, "vs_random_lo": 1.0, "vs_random_hi": 9.0, "vs_random_verdict": "win"}]
    for method, succ, shares in (("DMR", 90.0, "bf16 10% · w4 40% · w2 50%"), ("Random", 70.0, "bf16 10% · w4 40% · w2 50%"),
                                 ("DMR-w4", 85.0, "bf16 30% · w4 70% · w2 0%")):
        rows.append({"quant": "w4+w2", "method": method, "budget": 0.8, "success": succ, "high_frac": 0.1, "cost": 1.5,
                     "shares": shares, "vs_random": None if method == "Random" else succ - 70.0, "vs_random_lo": 2.0,
                     "vs_random_hi": 30.0, "vs_random_verdict": None if method == "Random" else "win",
                     "vs_binary": 5.0 if method == "DMR" else None, "vs_binary_lo": -1.0, "vs_binary_hi": 11.0,
                     "vs_binary_verdict": "tie", "vs_binary_ref": "DMR-w4"})
    table = pl.DataFrame(rows)
    claim = "\n".join(summary.claim(table))
    assert "| w2 | 0.4 | DMR |" in claim and "w4+w2" not in claim
    three = "\n".join(summary.three_precisions(table))
    assert ("| w4+w2 | 0.8 | DMR | 90.0 | +20.0 [+2.0, +30.0] win | +5.0 [-1.0, +11.0] tie (DMR-w4) | 1.50 | "
            "bf16 10% · w4 40% · w2 50% |") in three
    assert "| w4+w2 | 0.8 | DMR-w4 | 85.0 | +15.0 [+2.0, +30.0] win | – | 1.50 | bf16 30% · w4 70% · w2 0% |" in three
    assert summary.three_precisions(table.filter(pl.col("quant") != "w4+w2")) == []
