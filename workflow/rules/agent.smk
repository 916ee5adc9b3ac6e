# The tiny agent of the embedded default: expert data -> tokenizer -> behaviour cloning.


rule expert_data:
    input:
        data_input,
    output:
        f"{RESULTS}/{{benchmark}}/{{model}}/bc/episodes.jsonl",
    log:
        f"{RESULTS}/{{benchmark}}/{{model}}/logs/expert_data.log",
    params:
        env=lambda w: bench(w)["env"],
        env_kwargs=lambda w: as_json(env_kwargs(w)),
        n=lambda w: bench(w)["tasks"]["train"],
        noise=lambda w: model_cfg(w).get("expert", {}).get("noise", 0.2),
        clean=lambda w: model_cfg(w).get("expert", {}).get("clean_fraction", 0.5),
        # Only when set, so the commands of configs without it stay as they were.
        repeat=lambda w: "".join(f" --{k} {v}" for k, v in model_cfg(w).get("expert", {}).items()
                                 if k in ("repeat", "invalid")),
    resources:
        **rule_resources("expert_data"),
    conda:
        "../../envs/cpu.yaml"
    shell:
        "python -m dmr.expert --env {params.env} --env-kwargs {params.env_kwargs} --episodes {params.n} "
        "--noise {params.noise} --clean-fraction {params.clean}{params.repeat} --out {output} > {log} 2>&1"


rule tokenizer:
    input:
        rules.expert_data.output,
    output:
        directory(f"{RESULTS}/{{benchmark}}/{{model}}/tokenizer"),
    log:
        f"{RESULTS}/{{benchmark}}/{{model}}/logs/tokenizer.log",
    params:
        prompt=lambda w: as_json(bench(w)["prompt"]),
        vocab=lambda w: model_cfg(w).get("tokenizer", {}).get("vocab_size", 1024),
    resources:
        **rule_resources("tokenizer"),
    conda:
        "../../envs/cpu.yaml"
    shell:
        "python -m dmr.tokenizer --episodes {input} --prompt {params.prompt} --vocab-size {params.vocab} "
        "--out {output} > {log} 2>&1"


rule train_agent:
    input:
        episodes=rules.expert_data.output,
        tokenizer=rules.tokenizer.output,
    output:
        directory(f"{RESULTS}/{{benchmark}}/{{model}}/bf16/model"),
    log:
        f"{RESULTS}/{{benchmark}}/{{model}}/logs/train_agent.log",
    params:
        prompt=lambda w: as_json(bench(w)["prompt"]),
        arch=lambda w: as_json(model_cfg(w).get("arch")),
        train=lambda w: cli_flags(model_cfg(w).get("train")),
    threads: THREADS
    resources:
        **rule_resources("train_agent", THREADS),
    conda:
        "../../envs/cpu.yaml"
    shell:
        "python -m dmr.tiny_agent --episodes {input.episodes} --tokenizer {input.tokenizer} "
        "--prompt {params.prompt} --arch {params.arch} {params.train} --threads {threads} "
        "--out {output} > {log} 2>&1"
