# KL-ST (paper Sec. 4.2): step KL on bf16 rollouts of the training pool -> threshold tau -> router
# trained on 1[KL > tau] -> deployment thresholds calibrated on the calibration pool.

# params of the rules that read the KL pool with the cell's two models (kl, klst, klst_variant)
POOL_PARAMS = {
    "pool": lambda w, input: os.path.dirname(input.pool),
    "high": flags.model_dir,
    # the proposal encoder's low model: a ladder scheme's costliest low precision (dmr.router.load_router)
    "low": lambda w: flags.model_dir(w, lows(w.quant)[0]),
}


rule kl:
    input:
        pool=lambda w: f"{cell(RUN, w, quant='bf16', policy='full', run='train')}/steps.parquet",
        models=flags.routed_models,
    output:
        cell(KL),
    log:
        cell("logs/kl_{quant}.log"),
    benchmark:
        cell("benchmarks/kl/kl_{quant}.tsv")
    conda:
        "../../envs/cpu.yaml"
    threads: config["threads"]
    resources:
        **flags.resources("kl", config["threads"]),
    params:
        **POOL_PARAMS,
        backend=flags.backend,
        batch=config["evaluate"]["shards"],
        block=config["route"]["kl_block"],
    shell:
        "python -m dmr.kl --rollout {params.pool} --high {params.high} --low {params.low} --quant {wildcards.quant} "
        "{params.backend} --batch {params.batch} --kl-block {params.block} "
        "--out {output} > {log} 2>&1"


rule threshold:
    input:
        rules.kl.output,
    output:
        threshold=cell("{quant}/kl/threshold.json"),
        sweep=cell("{quant}/kl/sweep.parquet"),
        figure=report_cell(
            "figures/kl_hist_{quant}.png", "kl_hist.rst", "KL-ST", result="KL histogram", scheme="{quant}"
        ),
    log:
        cell("logs/threshold_{quant}.log"),
    benchmark:
        cell("benchmarks/threshold/threshold_{quant}.tsv")
    conda:
        "../../envs/cpu.yaml"
    resources:
        **flags.resources("threshold"),
    params:
        steps=flags.routed_steps,
        rule=cli_flags(config["route"]["threshold"]),
    shell:
        "python -m dmr.threshold --kl {input} --step-types {params.steps} {params.rule} "
        "--out {output.threshold} --sweep {output.sweep} --figure {output.figure} > {log} 2>&1"


rule labels:
    input:
        rules.kl.output,
    output:
        labels=cell("{quant}/kl/labels.parquet"),
        summary=cell(LABELS),
    log:
        cell("logs/labels_{quant}.log"),
    benchmark:
        cell("benchmarks/labels/labels_{quant}.tsv")
    conda:
        "../../envs/cpu.yaml"
    resources:
        **flags.resources("labels"),
    params:
        rule=cli_flags(config["route"]["threshold"]),
        steps=flags.routed_steps,
    shell:
        "python -m dmr.labels --kl {input} --action-types {params.steps} {params.rule} --out {output.labels} --summary {output.summary} > {log} 2>&1"


rule klst:
    # stage `router` is the cell's router; `router0` the round-0 router whose routed run of training
    # tasks gives the states `router` adds to its data when route.dagger.tasks > 0 (dmr.klst --dagger).
    input:
        # One KL pool and threshold per low precision (a ladder scheme A+B has two).
        kl=lambda w: [cell(KL, w, quant=q) for q in lows(w.quant)],
        threshold=lambda w: [rules.threshold.output.threshold.format(**{**w, "quant": q}) for q in lows(w.quant)],
        llm=lambda w: flags.built_models(w, "bf16"),
        # The proposal encoder replays the KL pool's rollout with the low model.
        pool=rules.kl.input.pool,
        models=rules.kl.input.models,
        # The final router's extra data (route.dagger): the round-0 router's routed run of training tasks.
        dagger=lambda w: (
            [flags.routed_run(w, "dmr0", "k", config["route"]["dagger"]["budget"], run="dagger")]
            if w.stage == "router" and config["route"]["dagger"]["tasks"]
            else []
        ),
    output:
        router=cell("{quant}/{stage}/router.json"),
        weights=cell("{quant}/{stage}/router.pt"),
        metrics=cell("{quant}/{stage}/metrics.json"),
        scores=cell("{quant}/{stage}/train_scores.parquet"),
    log:
        cell("logs/klst_{quant}_{stage}.log"),
    benchmark:
        cell("benchmarks/klst/klst_{quant}_{stage}.tsv")
    conda:
        "../../envs/cpu.yaml"
    threads: config["threads"]
    resources:
        **flags.resources("klst", config["threads"]),
    params:
        **POOL_PARAMS,
        precisions=lambda w: " ".join(["bf16", *lows(w.quant)]),
        args=flags.klst_args,
        dagger=lambda w, input: f" --dagger {' '.join(map(os.path.dirname, input.dagger))}" if input.dagger else "",
        out=lambda w, output: os.path.dirname(output.router),
        # Set by klst_variant, which shares this command: its threshold sweep, and --quiet.
        sweep="",
        quiet="",
    shell:
        "python -m dmr.klst --kl {input.kl} --threshold {input.threshold}{params.sweep} --precisions {params.precisions} "
        "--llm {params.high} {params.args} --rollout {params.pool} --low {params.low}{params.dagger}{params.quiet} "
        "--out {params.out} > {log} 2>&1"


rule calibrate:
    input:
        # The calibration pool's routed run of the router at the fixed threshold 0.5.
        run=lambda w: flags.routed_run(w, {"router": "dmr", "router0": "dmr0"}[w.stage], "t", 0.5, run="calib"),
        scores=rules.klst.output.scores,
        latency=flags.cost_coefficients,
    output:
        calibration=cell("{quant}/{stage}/calibration.json"),
        figure=report_cell(
            "figures/{stage}_scores_{quant}.png",
            "router_scores.rst",
            "KL-ST",
            result="{stage} scores",
            scheme="{quant}",
        ),
    log:
        cell("logs/calibrate_{quant}_{stage}.log"),
    benchmark:
        cell("benchmarks/calibrate/calibrate_{quant}_{stage}.tsv")
    conda:
        "../../envs/cpu.yaml"
    resources:
        **flags.resources("calibrate"),
    params:
        run=lambda w, input: os.path.dirname(input.run),
        budgets=flags.scheme_budgets,
        cost=lambda w, input: f" --coefficients {input.latency}" if input.latency else "",
    shell:
        "python -m dmr.calibrate --run {params.run} --train-scores {input.scores} --budgets {params.budgets}{params.cost} "
        "--out {output.calibration} --figure {output.figure} > {log} 2>&1"


# A two-precision router calibrated to cost budgets (dmr.calibrate --by-cost), where a ladder scheme
# of the cell meets it at equal modelled cost (policy dmr-cK).
use rule calibrate as calibrate_cost with:
    input:
        run=lambda w: flags.routed_run(w, "dmr", "t", 0.5, run="calib"),
        scores=lambda w: rules.klst.output.scores.format(**w, stage="router"),
        latency=cell(LATENCY),
    output:
        calibration=cell("{quant}/router/calibration_cost.json"),
        figure=cell("figures/router_scores_cost_{quant}.png"),
    log:
        cell("logs/calibrate_cost_{quant}.log"),
    benchmark:
        cell("benchmarks/calibrate_cost/calibrate_cost_{quant}.tsv")
    resources:
        **flags.resources("calibrate_cost"),
    params:
        run=lambda w, input: os.path.dirname(input.run),
        budgets=flags.cost_budgets,
        cost=lambda w, input: f" --by-cost --coefficients {input.latency}",


rule step_types:
    input:
        kl=rules.kl.output,
        threshold=rules.threshold.output.threshold,
    output:
        table=cell("{quant}/kl/step_types.parquet"),
        markdown=cell("{quant}/kl/step_types.md"),
        figure=cell("figures/kl_step_types_{quant}.png"),
    log:
        cell("logs/step_types_{quant}.log"),
    benchmark:
        cell("benchmarks/step_types/step_types_{quant}.tsv")
    conda:
        "../../envs/cpu.yaml"
    resources:
        **flags.resources("step_types"),
    params:
        title=lambda w: shlex.quote(f"{w.benchmark}/{w.model} {w.quant}"),
    shell:
        "python -m dmr.step_types --kl {input.kl} --threshold {input.threshold} --title {params.title} "
        "--out {output.table} --markdown {output.markdown} --figure {output.figure} > {log} 2>&1"


rule diagnose:
    # Where the routing signal is: the router against trivial rankers and the low model's own
    # uncertainty, offline on the KL pool's held-out episodes (dmr.diagnose).
    input:
        kl=rules.kl.output,
        threshold=rules.threshold.output.threshold,
        scores=lambda w: rules.klst.output.scores.format(**w, stage="router"),
        # The online probe run at the middle budget (0.4 in the paper's sweep).
        probe=lambda w: flags.routed_run(
            w, "dmr", "k", config["route"]["budgets"][len(config["route"]["budgets"]) // 2], run="probe"
        ),
    output:
        table=cell("tables/diagnose_{quant}.parquet"),
        markdown=cell("tables/diagnose_{quant}.md"),
    log:
        cell("logs/diagnose_{quant}.log"),
    benchmark:
        cell("benchmarks/diagnose/diagnose_{quant}.tsv")
    conda:
        "../../envs/cpu.yaml"
    resources:
        **flags.resources("diagnose"),
    params:
        router=lambda w, input: os.path.dirname(input.scores),
        budgets=flags.budgets,
        steps=flags.routed_steps,
    shell:
        "python -m dmr.diagnose --kl {input.kl} --router {params.router} --threshold {input.threshold} "
        "--budgets {params.budgets} --online {input.probe} --step-types {params.steps} "
        "--title '{wildcards.benchmark}/{wildcards.model} {wildcards.quant}: routing signal' "
        "--out {output.table} > {log} 2>&1"


rule regime_table:
    # Is the cell in the paper's regime? Per scheme of `cells[].regime` (default its quants): (a) the
    # Full - Quant gap, (b) a sparse plateau, (c) the oracle at K = 0.4 where routed (dmr.regime).
    input:
        unpack(flags.regime_inputs),
    output:
        table=cell("tables/regime.parquet"),
        markdown=cell("tables/regime.md"),
    log:
        cell("logs/regime.log"),
    benchmark:
        cell("benchmarks/regime/regime.tsv")
    conda:
        "../../envs/cpu.yaml"
    resources:
        **flags.resources("regime"),
    params:
        cell=lambda w: cell("", w).rstrip("/"),
        schemes=lambda w: " ".join(flags.regime_schemes(w)),
        seeds=" ".join(str(s) for s in config["evaluate"]["seeds"]),
        steps=flags.routed_steps,
    shell:
        "python -m dmr.regime --cell {params.cell} --schemes {params.schemes} --seeds {params.seeds} "
        "--step-types {params.steps} --out {output.table} > {log} 2>&1"


rule regime:
    # `make regime`: every cell's regime table, outside the default run (each scheme costs its
    # quantization, a KL pool and Quant rollouts at every seed).
    input:
        lambda w: [cell("tables/regime.md", c) for c in config["cells"]],
    localrule: True
