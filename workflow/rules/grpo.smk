# Latency calibration (App. A), GRPO refinement of the KL-ST router (Sec. 4.3), and the
# average-rank analysis (Sec. 5.3).


rule latency:
    input:
        latency_inputs,
    output:
        coefficients=f"{RESULTS}/{{benchmark}}/{{model}}/latency/coefficients.json",
        table=f"{RESULTS}/{{benchmark}}/{{model}}/tables/latency.parquet",
        markdown=f"{RESULTS}/{{benchmark}}/{{model}}/tables/latency.md",
    log:
        f"{RESULTS}/{{benchmark}}/{{model}}/logs/latency.log",
    benchmark:
        f"{RESULTS}/{{benchmark}}/{{model}}/benchmarks/latency/latency.tsv"
    conda:
        "../../envs/cpu.yaml"
    threads: THREADS
    resources:
        **rule_resources("latency", THREADS),
    params:
        args=latency_args,
    shell:
        "python -m dmr.latency --cell {wildcards.benchmark}/{wildcards.model} {params.args} "
        "--out {output.coefficients} --table {output.table} > {log} 2>&1"


rule grpo:
    input:
        router=f"{RESULTS}/{{benchmark}}/{{model}}/{{quant}}/router/router.json",
        weights=f"{RESULTS}/{{benchmark}}/{{model}}/{{quant}}/router/router.pt",
        latency=rules.latency.output.coefficients,
        models=kl_models,
    output:
        router=f"{RESULTS}/{{benchmark}}/{{model}}/{{quant}}/grpo/lam{{lam}}/router/router.json",
        weights=f"{RESULTS}/{{benchmark}}/{{model}}/{{quant}}/grpo/lam{{lam}}/router/router.pt",
        scores=f"{RESULTS}/{{benchmark}}/{{model}}/{{quant}}/grpo/lam{{lam}}/router/train_scores.parquet",
        curve=f"{RESULTS}/{{benchmark}}/{{model}}/{{quant}}/grpo/lam{{lam}}/curve.parquet",
        figure=f"{RESULTS}/{{benchmark}}/{{model}}/figures/grpo_curve_{{quant}}_lam{{lam}}.png",
    log:
        f"{RESULTS}/{{benchmark}}/{{model}}/logs/grpo_{{quant}}_lam{{lam}}.log",
    benchmark:
        f"{RESULTS}/{{benchmark}}/{{model}}/benchmarks/grpo/grpo_{{quant}}_lam{{lam}}.tsv"
    conda:
        "../../envs/cpu.yaml"
    threads: THREADS
    resources:
        **rule_resources("grpo", THREADS),
    params:
        start=router_dir,
        env=lambda w: bench(w)["env"],
        env_kwargs=lambda w: as_json(env_kwargs(w)),
        # Training tasks after the KL pool's, so GRPO sees episodes KL-ST did not.
        offset=route_cfg().get("kl_tasks", 1000),
        pool=lambda w: bench(w)["tasks"]["train"],
        models=lambda w: " ".join(f"--model {q}={model_dir(w.benchmark, w.model, q)}" for q in ("bf16", w.quant)),
        backend=config["backend"]["name"],
        backend_kwargs=as_json(config["backend"].get("kwargs")),
        decoding=decoding_args,
        shards=config["evaluate"].get("shards", 16),
        grpo=grpo_args,
        out=lambda w: f"{cell_dir(w)}/{w.quant}/grpo/lam{w.lam}",
    shell:
        "python -m dmr.grpo --router {params.start} --latency {input.latency} --quant {wildcards.quant} "
        "--env {params.env} --env-kwargs {params.env_kwargs} --offset {params.offset} --pool {params.pool} {params.models} "
        "--backend {params.backend} --backend-kwargs {params.backend_kwargs} {params.decoding} "
        "--shards {params.shards} {params.grpo} --out {params.out} --figure {output.figure} --quiet > {log} 2>&1"


rule calibrate_grpo:
    input:
        run=lambda w: f"{run_dir(w.benchmark, w.model, w.quant, format_policy('grpo', 't', 0.5), 'calib')}/steps.parquet",
        scores=lambda w: f"{grpo_router_dir(w)}/train_scores.parquet",
    output:
        calibration=f"{RESULTS}/{{benchmark}}/{{model}}/{{quant}}/grpo/lam{GRPO_LAMBDA}/router/calibration.json",
        figure=f"{RESULTS}/{{benchmark}}/{{model}}/figures/router_scores_{{quant}}_grpo_lam{GRPO_LAMBDA}.png",
    log:
        f"{RESULTS}/{{benchmark}}/{{model}}/logs/calibrate_{{quant}}_grpo.log",
    benchmark:
        f"{RESULTS}/{{benchmark}}/{{model}}/benchmarks/calibrate_grpo/calibrate_{{quant}}_grpo.tsv"
    conda:
        "../../envs/cpu.yaml"
    resources:
        **rule_resources("calibrate_grpo"),
    params:
        run=lambda w, input: os.path.dirname(input.run),
        budgets=" ".join(f"{k:g}" for k in route_cfg().get("budgets", [0.2, 0.4, 0.7])),
    shell:
        "python -m dmr.calibrate --run {params.run} --train-scores {input.scores} --budgets {params.budgets} "
        "--out {output.calibration} --figure {output.figure} > {log} 2>&1"


rule rank:
    input:
        table=rules.evaluate.output.table,
        latency=rules.latency.output.coefficients,
    output:
        ranks=f"{RESULTS}/{{benchmark}}/{{model}}/tables/rank.parquet",
        summary=f"{RESULTS}/{{benchmark}}/{{model}}/tables/rank_summary.parquet",
        markdown=f"{RESULTS}/{{benchmark}}/{{model}}/tables/rank.md",
        figure=f"{RESULTS}/{{benchmark}}/{{model}}/figures/pareto_rank.png",
    log:
        f"{RESULTS}/{{benchmark}}/{{model}}/logs/rank.log",
    benchmark:
        f"{RESULTS}/{{benchmark}}/{{model}}/benchmarks/rank/rank.tsv"
    conda:
        "../../envs/cpu.yaml"
    resources:
        **rule_resources("rank"),
    shell:
        "python -m dmr.rank --table {input.table} --latency {input.latency} --out {output.ranks} "
        "--markdown {output.markdown} --figure {output.figure} > {log} 2>&1"
