# Router ablations (paper Sec. 5.4 depth, 5.5 threshold, Table 5 action-only vs all-step): one
# KL-ST router per variant, compared offline on the KL pool's held-out episodes (dmr.ablation).


rule klst_variant:
    input:
        kl=rules.kl.output,
        threshold=rules.threshold.output.threshold,
        sweep=rules.threshold.output.sweep,
        labels=variant_labels,
        llm=bf16_input,
        pool=rules.kl.input.pool,
        models=kl_models,
    output:
        router=f"{RESULTS}/{{benchmark}}/{{model}}/{{quant}}/ablation/{{variant}}/router/router.json",
        weights=f"{RESULTS}/{{benchmark}}/{{model}}/{{quant}}/ablation/{{variant}}/router/router.pt",
        metrics=f"{RESULTS}/{{benchmark}}/{{model}}/{{quant}}/ablation/{{variant}}/router/metrics.json",
        scores=f"{RESULTS}/{{benchmark}}/{{model}}/{{quant}}/ablation/{{variant}}/router/train_scores.parquet",
    log:
        f"{RESULTS}/{{benchmark}}/{{model}}/logs/klst_{{quant}}_{{variant}}.log",
    benchmark:
        f"{RESULTS}/{{benchmark}}/{{model}}/benchmarks/klst_variant/klst_{{quant}}_{{variant}}.tsv"
    conda:
        "../../envs/cpu.yaml"
    threads: THREADS
    resources:
        **rule_resources("klst_variant", THREADS),
    params:
        llm=lambda w: model_dir(w.benchmark, w.model, "bf16"),
        args=variant_klst_args,
        pool=lambda w: run_dir(w.benchmark, w.model, "bf16", "full", "train"),
        low=lambda w: model_dir(w.benchmark, w.model, w.quant),
        out=lambda w: f"{cell_dir(w)}/{w.quant}/ablation/{w.variant}/router",
    shell:
        "python -m dmr.klst --kl {input.kl} --threshold {input.threshold} --sweep {input.sweep} "
        "--precisions bf16 {wildcards.quant} --llm {params.llm} {params.args} --rollout {params.pool} --low {params.low} "
        "--quiet --out {params.out} > {log} 2>&1"


rule ablation:
    input:
        routers=ablation_inputs,
        threshold=rules.threshold.output.threshold,
    output:
        table=f"{RESULTS}/{{benchmark}}/{{model}}/tables/ablation_{{quant}}.parquet",
        markdown=f"{RESULTS}/{{benchmark}}/{{model}}/tables/ablation_{{quant}}.md",
        figure=f"{RESULTS}/{{benchmark}}/{{model}}/figures/ablation_{{quant}}.png",
    log:
        f"{RESULTS}/{{benchmark}}/{{model}}/logs/ablation_{{quant}}.log",
    benchmark:
        f"{RESULTS}/{{benchmark}}/{{model}}/benchmarks/ablation/ablation_{{quant}}.tsv"
    conda:
        "../../envs/cpu.yaml"
    resources:
        **rule_resources("ablation"),
    params:
        routers=ablation_args,
        budgets=" ".join(f"{k:g}" for k in route_cfg().get("budgets", [0.2, 0.4, 0.7])),
        steps=lambda w: " ".join(routed_steps(w)),
    shell:
        "python -m dmr.ablation {params.routers} --threshold {input.threshold} --budgets {params.budgets} --step-types {params.steps} "
        "--title 'Router ablations: {wildcards.benchmark}/{wildcards.model}, {wildcards.quant}' "
        "--out {output.table} --figure {output.figure} > {log} 2>&1"


rule ablations:
    input:
        all_ablation_targets,
    # `make ablations`: every routed cell's ablation table (Sec. 5.4, 5.5), outside the default run.
    localrule: True
