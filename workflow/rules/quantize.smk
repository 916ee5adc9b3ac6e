# Low-precision copies of a cell's bf16 model (llmcompressor oneshot, paper App. E).


rule quantize:
    input:
        model=bf16_input,
        calibration=calibration_input,
    output:
        directory(f"{RESULTS}/{{benchmark}}/{{model}}/{{quant}}/model"),
    log:
        f"{RESULTS}/{{benchmark}}/{{model}}/logs/quantize_{{quant}}.log",
    benchmark:
        f"{RESULTS}/{{benchmark}}/{{model}}/benchmarks/quantize/quantize_{{quant}}.tsv"
    wildcard_constraints:
        quant="(gptq|awq|rtn)_w[2-8]a16(_g[0-9]+)?",
    conda:
        "../../envs/cpu.yaml"
    threads: THREADS
    resources:
        **rule_resources("quantize", THREADS),
    params:
        bf16=lambda w: model_dir(w.benchmark, w.model, "bf16"),
        calibration=calibration_arg,
        samples=lambda w: model_cfg(w).get("quantize", {}).get("calibration", {}).get("samples", 128),
        max_len=lambda w: model_cfg(w).get("quantize", {}).get("calibration", {}).get("max_seq_length", 2048),
        prompt=lambda w: as_json(bench(w)["prompt"]),
    shell:
        "python -m dmr.quantize --model {params.bf16} --scheme {wildcards.quant} "
        "--calibration {params.calibration} --samples {params.samples} --max-seq-length {params.max_len} "
        "--prompt {params.prompt} --out {output} > {log} 2>&1"
