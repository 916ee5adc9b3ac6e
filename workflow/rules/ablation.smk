# Router ablations (paper Sec. 5.4 depth, 5.5 threshold, Table 5 action-only vs all-step): one
# KL-ST router per variant, compared offline on the KL pool's held-out episodes (dmr.ablation).


rule klst_variant:
    input:
        kl=rules.kl.output,
        threshold=rules.threshold.output.threshold,
        sweep=rules.threshold.output.sweep,
        # The all-step variant is labelled with the all-step tau of dmr.labels.
        labels=lambda w: [rules.labels.output.summary] if w.variant == "steps-as" else [],
        llm=rules.klst.input.llm,
        pool=rules.kl.input.pool,
        models=rules.kl.input.models,
    output:
        router=cell("{quant}/ablation/{variant}/router/router.json"),
        weights=cell("{quant}/ablation/{variant}/router/router.pt"),
        metrics=cell("{quant}/ablation/{variant}/router/metrics.json"),
        scores=cell("{quant}/ablation/{variant}/router/train_scores.parquet"),
    log:
        cell("logs/klst_{quant}_{variant}.log"),
    benchmark:
        cell("benchmarks/klst_variant/klst_{quant}_{variant}.tsv")
    conda:
        "../../envs/cpu.yaml"
    threads: config["threads"]
    resources:
        **flags.resources("klst_variant", config["threads"]),
    params:
        **POOL_PARAMS,
        args=flags.klst_args,
        out=rules.klst.params.out,
    shell:
        "python -m dmr.klst --kl {input.kl} --threshold {input.threshold} --sweep {input.sweep} "
        "--precisions bf16 {wildcards.quant} --llm {params.high} {params.args} --rollout {params.pool} --low {params.low} "
        "--quiet --out {params.out} > {log} 2>&1"


rule ablation:
    input:
        routers=lambda w: [f"{flags.ablation_router(w, v)}/metrics.json" for v in flags.ablation_variants],
        threshold=rules.threshold.output.threshold,
    output:
        table=cell("tables/ablation_{quant}.parquet"),
        markdown=cell("tables/ablation_{quant}.md"),
        figure=cell("figures/ablation_{quant}.png"),
    log:
        cell("logs/ablation_{quant}.log"),
    benchmark:
        cell("benchmarks/ablation/ablation_{quant}.tsv")
    conda:
        "../../envs/cpu.yaml"
    resources:
        **flags.resources("ablation"),
    params:
        routers=lambda w: " ".join(f"--router {v} {flags.ablation_router(w, v)}" for v in flags.ablation_variants),
        budgets=flags.budgets,
        steps=flags.routed_steps,
    shell:
        "python -m dmr.ablation {params.routers} --threshold {input.threshold} --budgets {params.budgets} --step-types {params.steps} "
        "--title 'Router ablations: {wildcards.benchmark}/{wildcards.model}, {wildcards.quant}' "
        "--out {output.table} --figure {output.figure} > {log} 2>&1"


rule ablations:
    # `make ablations`: every routed cell's ablation table (Sec. 5.4, 5.5), outside the default run.
    input:
        lambda w: [
            cell(f"tables/ablation_{q}.md", c)
            for c in (config["cells"] if flags.ablation_variants else [])
            for q in flags.cell_cfg(c)["route"]
        ],
    localrule: True
