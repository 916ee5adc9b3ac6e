# Latency calibration (App. A), GRPO refinement of the KL-ST router (Sec. 4.3), and the
# average-rank analysis (Sec. 5.3).


rule latency:
    input:
        lambda w: flags.latency(w)[0],
    output:
        coefficients=cell(LATENCY),
        table=cell("tables/latency.parquet"),
        markdown=cell("tables/latency.md"),
    log:
        cell("logs/latency.log"),
    benchmark:
        cell("benchmarks/latency/latency.tsv")
    conda:
        "../../envs/cpu.yaml"
    threads: config["threads"]
    resources:
        **flags.resources("latency", config["threads"]),
    params:
        args=lambda w: flags.latency(w)[1],
    shell:
        "python -m dmr.latency --cell {wildcards.benchmark}/{wildcards.model} {params.args} "
        "--out {output.coefficients} --table {output.table} > {log} 2>&1"


rule grpo:
    input:
        router=cell("{quant}/router/router.json"),
        weights=cell("{quant}/router/router.pt"),
        latency=rules.latency.output.coefficients,
        models=flags.routed_models,
    output:
        router=cell("{quant}/grpo/lam{lam}/router/router.json"),
        weights=cell("{quant}/grpo/lam{lam}/router/router.pt"),
        scores=cell("{quant}/grpo/lam{lam}/router/train_scores.parquet"),
        curve=cell("{quant}/grpo/lam{lam}/curve.parquet"),
        figure=cell("figures/grpo_curve_{quant}_lam{lam}.png"),
    log:
        cell("logs/grpo_{quant}_lam{lam}.log"),
    benchmark:
        cell("benchmarks/grpo/grpo_{quant}_lam{lam}.tsv")
    conda:
        "../../envs/cpu.yaml"
    threads: config["threads"]
    resources:
        **flags.resources("grpo", config["threads"]),
    params:
        start=lambda w, input: os.path.dirname(input.router),
        env=flags.env_args,
        # Training tasks after the KL pool's, so GRPO sees episodes KL-ST did not.
        offset=flags.kl_end,
        pool=lambda w: flags.bench(w)["tasks"]["train"],
        models=lambda w: flags.model_flags(w, "bf16", *lows(w.quant)),
        engine=flags.engine_args,
        flags=flags.grpo_flags,
        # --router-steps only where GRPO decides other step types than KL-ST, so other cells keep their commands.
        steps=lambda w: flags.router_steps_flag(w, "grpo", flags.routed_steps(w)),
        out=lambda w, output: os.path.dirname(output.curve),
    shell:
        "python -m dmr.grpo --router {params.start} --latency {input.latency} --quant {wildcards.quant} "
        "{params.env} --offset {params.offset} --pool {params.pool} {params.models} "
        "{params.engine} --lam {wildcards.lam} {params.flags}{params.steps} --out {params.out} --figure {output.figure} --quiet > {log} 2>&1"


# The GRPO router's deployment thresholds, as rule calibrate gives the KL-ST router's: its routed run of
# the calibration pool at the fixed threshold 0.5, then dmr.calibrate (its figure is not in the report).
use rule calibrate as calibrate_grpo with:
    input:
        run=lambda w: flags.routed_run(w, "grpo", "t", 0.5, run="calib"),
        scores=lambda w: f"{flags.router_dir(w, 'grpo')}/train_scores.parquet",
        latency=flags.cost_coefficients,
    output:
        calibration=cell(f"{{quant}}/grpo/lam{flags.grpo_lambda}/router/calibration.json"),
        figure=cell(f"figures/router_scores_{{quant}}_grpo_lam{flags.grpo_lambda}.png"),
    log:
        cell("logs/calibrate_{quant}_grpo.log"),
    benchmark:
        cell("benchmarks/calibrate_grpo/calibrate_{quant}_grpo.tsv")
    resources:
        **flags.resources("calibrate_grpo"),


rule rank:
    input:
        table=rules.evaluate.output.table,
        latency=rules.latency.output.coefficients,
    output:
        ranks=cell("tables/rank.parquet"),
        summary=cell("tables/rank_summary.parquet"),
        markdown=cell("tables/rank.md"),
        figure=cell("figures/pareto_rank.png"),
    log:
        cell("logs/rank.log"),
    benchmark:
        cell("benchmarks/rank/rank.tsv")
    conda:
        "../../envs/cpu.yaml"
    resources:
        **flags.resources("rank"),
    shell:
        "python -m dmr.rank --table {input.table} --latency {input.latency} --out {output.ranks} "
        "--markdown {output.markdown} --figure {output.figure} > {log} 2>&1"
