# Router ablations (paper Sec. 5.4 depth, 5.5 threshold, Table 5 action-only vs all-step): one
# KL-ST router per variant, compared offline on the KL pool's held-out episodes and online, as the
# paper judges them, by the success of its routed runs at each budget K (dmr.ablation).


# A variant's router: rule klst's command with the variant's settings (flags.klst_args reads the
# `variant` wildcard), its threshold sweep and no DAgger round.
use rule klst as klst_variant with:
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
        router=cell(f"{ABLATION}/router/router.json"),
        weights=cell(f"{ABLATION}/router/router.pt"),
        metrics=cell(f"{ABLATION}/router/metrics.json"),
        scores=cell(f"{ABLATION}/router/train_scores.parquet"),
    log:
        cell("logs/klst_{quant}_{variant}.log"),
    benchmark:
        cell("benchmarks/klst_variant/klst_{quant}_{variant}.tsv")
    resources:
        **flags.resources("klst_variant", config["threads"]),
    params:
        sweep=lambda w, input: f" --sweep {input.sweep}",
        dagger="",
        quiet=" --quiet",


# A variant's deployment thresholds, as the cell's router gets them (rule calibrate): its routed run of
# the calibration pool at the fixed threshold 0.5, then dmr.calibrate.
use rule calibrate as calibrate_variant with:
    input:
        run=lambda w: flags.routed_run(w, "dmr", "t", 0.5, pattern=ABLATION_RUN, run="calib"),
        scores=rules.klst_variant.output.scores,
        latency=flags.cost_coefficients,
    output:
        calibration=cell(f"{ABLATION}/router/calibration.json"),
        figure=cell(f"{ABLATION}/router/calibration_scores.png"),
    log:
        cell("logs/calibrate_{quant}_ablation_{variant}.log"),
    benchmark:
        cell("benchmarks/calibrate_variant/calibrate_{quant}_{variant}.tsv")


# A variant's routed runs (dmr-tT of the calibration pool, dmr-kK of the test seeds): rule rollout with
# the variant's router (flags.rollout_spec reads the `variant` wildcard), beside that router.
use rule rollout as rollout_variant with:
    output:
        episodes=cell(f"{ABLATION_RUN}/episodes.parquet"),
        steps=cell(f"{ABLATION_RUN}/steps.parquet"),
    log:
        cell("logs/rollout_{quant}_ablation_{variant}_{policy}_{run}.log"),
    benchmark:
        cell("benchmarks/rollout_variant/rollout_{quant}_{variant}_{policy}_{run}.tsv")


rule ablation:
    input:
        routers=lambda w: [f"{flags.ablation_router(w, v)}/metrics.json" for v in flags.ablation_variants],
        threshold=rules.threshold.output.threshold,
        # route.ablation.online: each variant's routed runs and the cell's DMR runs they are paired with.
        online=lambda w: flags.ablation_online(w)[0],
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
        online=lambda w: flags.ablation_online(w)[1],
    shell:
        "python -m dmr.ablation {params.routers} --threshold {input.threshold} --budgets {params.budgets} --step-types {params.steps} {params.online} "
        "--title 'Router ablations: {wildcards.benchmark}/{wildcards.model}, {wildcards.quant}' "
        "--out {output.table} --figure {output.figure} > {log} 2>&1"


rule ablations:
    # `make ablations`: every routed cell's ablation table (Sec. 5.4, 5.5), outside the default run.
    input:
        lambda w: [
            cell(f"tables/ablation_{q}.md", c)
            for c in (config["cells"] if flags.ablation_variants else [])
            for q in flags.cell_cfg(c)["route"]
            if not ladder(q)  # a ladder scheme's ablations are its low precisions' routers'
        ],
    localrule: True
