#!/usr/bin/env bash
# GPU check (issue 29, item 8): one script for a short GPU lease (about 8 minutes), for the tiny
# household agent (config/config.yaml's cell household/tiny, agents/tiny):
#   - llmcompressor GPTQ-W4A16, AWQ-W4A16 and GPTQ-W3A16 g128 on the GPU (dmr.quantize);
#   - the micro cell and per-step latency on the HF backend: Full, Quant per scheme, Random 0.5;
#   - rollout throughput at 1 vs 16 shards (benchmarks/rollout_throughput.py);
#   - a bf16 KL pool (Full on train tasks) and its step KL per scheme on the HF backend (exact);
#   - where a vLLM can run: one server per precision with its GPU kernels (W3A16 is expected to be
#     refused: vLLM has no 3-bit kernel, App. A.3), the same pool's step KL through vLLM (top-20)
#     against HF's, the same rollouts and throughput through `--backend vllm`, and one `dmr.agent
#     --backend vllm` run that starts and stops its own server.
# Every stage runs under `timeout` inside one overall budget; a failed or skipped stage is recorded
# with its reason and the script goes on. Results: $OUT/results.{json,md}, $OUT/gpu_check.log and
# $OUT/artefacts.tar.gz (logs, rollouts, KL rows; benchmarks/README.md, "GPU check").
#
#   bash benchmarks/gpu_check.sh                 the check ($OUT, else ./gpu_check_out)
#   bash benchmarks/gpu_check.sh --cpu-smoke     the same stages at tiny sizes on this CPU, HF only
#                                                (also DMR_GPU_CHECK_DRY=1); vLLM stages skip unless
#                                                DMR_VLLM_PYTHON names a Python with vLLM
#   bash benchmarks/gpu_check.sh --fetch-wheels  here, before a device run: the packages the device
#                                                image lacks, as wheels in .whl/ (carried), + SOURCE
#
# Environment: DMR_GPU_CHECK_BUDGET (seconds, default 450; 1200 for --cpu-smoke),
# DMR_GPU_CHECK_WORK (default /tmp/gpu-check), DMR_VLLM_PYTHON (a Python with vLLM),
# DMR_GPU_CHECK_VLLM_ARGS (vLLM server arguments, default --enforce-eager), PYTHON (--cpu-smoke,
# --fetch-wheels: the project's Python, default `python`).
set -uo pipefail

SELF=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")
REPO=$(cd "$(dirname "$SELF")/.." && pwd)
cd "$REPO" || exit 2

# ------------------------------------------------------------------------------------ helpers
ms() { echo $(($(date +%s%N) / 1000000)); }
say() { echo "[gpu-check $(date +%T)] $*"; }

# record NAME STATUS RC SECONDS LIMIT REASON: one line of stages.tsv (gpu_check.py read_stages)
record() {
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" "$(printf '%s' "$6" | tr '\t\n' '  ')" >>"$WORK/stages.tsv"
    say "$1: $2${6:+ ($6)}${4:+ after ${4}s}"
}
skip() { record "$1" skipped "" "" "" "$2"; }

# stage NAME LIMIT CMD...: CMD under `timeout`, within what is left of the budget, output to
# logs/NAME.log; returns 0 when it succeeded.
stage() {
    local name=$1 limit=$2
    shift 2
    local left=$((DEADLINE - RESERVE - $(date +%s)))
    ((left < limit)) && limit=$left
    if ((limit < 10)); then
        skip "$name" "no time left in the ${BUDGET}s budget"
        return 1
    fi
    say "$name (at most ${limit}s): $*"
    local t0 rc status=ok
    t0=$(ms)
    timeout -k 10 "$limit" "$@" >"$WORK/logs/$name.log" 2>&1
    rc=$?
    case $rc in 0) ;; 124 | 137) status=timeout ;; *) status=failed ;; esac
    record "$name" "$status" "$rc" "$(awk "BEGIN {printf \"%.1f\", ($(ms) - $t0) / 1000}")" "$limit" ""
    [ "$status" = ok ] || tail -n 5 "$WORK/logs/$name.log" | sed 's/^/    /'
    [ "$status" = ok ]
}

# ------------------------------------------------------------------- steps run as child processes
# Each runs as `bash gpu_check.sh --step NAME` so that `timeout` can box it; state goes through files.

# The main Python: the image's python3 (CUDA torch) with the missing packages installed beside it
# (--target, from the carried wheels or a package index), or a venv from a package index where
# python3 has no CUDA torch. Writes $WORK/env.sh.
step_env_main() {
    local site=$WORK/site py=python3
    if python3 -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
        if compgen -G ".whl/*.whl" >/dev/null; then
            echo "python3 has a CUDA torch; installing the carried wheels (.whl) beside it"
            python3 -m pip install --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl || return 1
        elif [ "$REGISTRY" = yes ]; then
            echo "python3 has a CUDA torch; installing what it lacks from the package index"
            # shellcheck disable=SC2046
            python3 -m pip install --no-deps --target "$site" $(python3 benchmarks/gpu_check.py pins --overlay --client) || return 1
        else
            echo "python3 has a CUDA torch, but no wheels were carried (.whl) and no package index answers:"
            echo "run 'bash benchmarks/gpu_check.sh --fetch-wheels' here and carry .whl"
            return 3
        fi
    elif [ "$REGISTRY" = yes ]; then
        echo "python3 has no CUDA torch: a venv from the package index (torch from requirements.txt's pin)"
        python3 -m venv "$WORK/venv-main" || return 1
        py=$WORK/venv-main/bin/python
        # shellcheck disable=SC2046
        "$py" -m pip install $(python3 benchmarks/gpu_check.py pins torch transformers tokenizers llmcompressor \
            compressed-tensors polars pyarrow tqdm openai pyyaml) || return 1
    else
        echo "python3 has no CUDA torch and no package index answers: nothing to run the stages with"
        return 3
    fi
    printf 'PY=%q\nexport PYTHONPATH=%q\n' "$py" "$site:$REPO" >"$WORK/env.sh"
    PYTHONPATH=$site:$REPO "$py" -c 'import torch, transformers, polars, llmcompressor, datasets, dmr.quantize, dmr.agent
print("imports ok: torch", torch.__version__, "cuda", torch.cuda.is_available(), "transformers", transformers.__version__,
      "llmcompressor", llmcompressor.__version__, "polars", polars.__version__)'
}

# A Python that can start vLLM's server: $DMR_VLLM_PYTHON, python3 if it has vllm, else a venv with
# envs/vllm.yaml's vllm from the package index. Writes the wrapper $WORK/vllm-python, which drops
# PYTHONPATH so that the main env's packages (compressed-tensors 0.19) stay out of the servers.
step_env_vllm() {
    local vpy
    if [ -n "${DMR_VLLM_PYTHON:-}" ]; then
        vpy=$DMR_VLLM_PYTHON
    elif env -u PYTHONPATH python3 -c 'import vllm' 2>/dev/null; then
        vpy=$(command -v python3)
    else
        local pin
        pin=$(grep -o 'vllm==[0-9][0-9.a-z]*' envs/vllm.yaml | head -n 1)
        echo "installing $pin into $WORK/venv-vllm"
        python3 -m venv "$WORK/venv-vllm" || return 1
        "$WORK/venv-vllm/bin/python" -m pip install "$pin" || return 1
        vpy=$WORK/venv-vllm/bin/python
    fi
    printf '#!/bin/sh\nunset PYTHONPATH\nexec %q "$@"\n' "$vpy" >"$WORK/vllm-python"
    chmod +x "$WORK/vllm-python"
    "$WORK/vllm-python" -c 'import vllm, vllm.entrypoints.openai.api_server; print("vllm", vllm.__version__)'
}

# ------------------------------------------------------------------------------ --fetch-wheels
fetch_wheels() {
    local py=${PYTHON:-python} dest=$REPO/.whl pyver=${DMR_GPU_PYTHON_VERSION:-3.12}
    grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
    rm -rf "$dest" && mkdir -p "$dest"
    local reqs
    reqs=$("$py" benchmarks/gpu_check.py wheels) || return 1
    echo "downloading for CPython $pyver (the device image's python3): $(echo "$reqs" | tr '\n' ' ')"
    # shellcheck disable=SC2086
    "$py" -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$dest" $reqs || return 1
    local dirty=false
    [ -n "$(git status --porcelain --untracked-files=no)" ] && dirty=true
    printf '{"commit": "%s", "dirty": %s, "fetched": "%s"}\n' "$(git rev-parse HEAD)" "$dirty" "$(date -u +%FT%TZ)" \
        >"$dest/SOURCE"
    # What the device tool sends: tracked and untracked-not-ignored files, plus the carried .whl.
    local tree wheels limit=$((64 * 1024 * 1024))
    tree=$({ git ls-files -z; git ls-files -z -o --exclude-standard; } | du -cb --files0-from=- 2>/dev/null | tail -n 1 | cut -f1)
    wheels=$(du -sb "$dest" | cut -f1)
    echo "working tree $((tree / 1024)) KiB + .whl $((wheels / 1024)) KiB = $(((tree + wheels) / 1024)) KiB of the 65536 KiB the tool carries"
    if ((tree + wheels > limit)); then
        echo "too large for the device tool: shrink the working tree or the wheel set" >&2
        return 1
    fi
}

# ---------------------------------------------------------------------------------------- main
if [ "${1:-}" = --step ]; then
    "step_$2"
    exit $?
fi

DRY=${DMR_GPU_CHECK_DRY:-0}
case "${1:-}" in
    "") ;;
    --cpu-smoke) DRY=1 ;;
    --fetch-wheels)
        fetch_wheels
        exit $?
        ;;
    -h | --help)
        sed -n '2,/^set -uo/p' "$SELF" | sed '$d' | sed 's/^# \{0,1\}//'
        exit 0
        ;;
    *)
        echo "unknown argument ${1}; see --help" >&2
        exit 2
        ;;
esac

OUT=${OUT:-$REPO/gpu_check_out}
WORK=${DMR_GPU_CHECK_WORK:-/tmp/gpu-check}
if [ "$DRY" = 1 ]; then BUDGET=${DMR_GPU_CHECK_BUDGET:-1200}; else BUDGET=${DMR_GPU_CHECK_BUDGET:-450}; fi
RESERVE=30 # seconds kept for gathering and packing
DEADLINE=$(($(date +%s) + BUDGET))
VLLM_ARGS=${DMR_GPU_CHECK_VLLM_ARGS:---enforce-eager}
GMU=0.08 # each server's share of the GPU (the H200's 141 GB: ~11 GB each, six servers at most)
# Only a folder this script made is emptied.
if [ -e "$WORK" ] && [ ! -e "$WORK/stages.tsv" ] && [ -n "$(ls -A "$WORK")" ]; then
    echo "$WORK exists and is not a gpu_check work folder; set DMR_GPU_CHECK_WORK" >&2
    exit 2
fi
rm -rf "$WORK"
mkdir -p "$WORK/logs" "$OUT"
: >"$WORK/stages.tsv"
export REPO WORK REGISTRY=not-probed PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
# Nothing is downloaded at run time: no model hub, no usage reports.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
exec 3>&1 4>&2
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
TEE_PID=$!
say "mode $([ "$DRY" = 1 ] && echo cpu-smoke || echo gpu), budget ${BUDGET}s, work $WORK, out $OUT"

# 1. The machine and its Python.
if [ "$DRY" = 1 ]; then
    skip registry "cpu smoke: installs nothing"
    PY=$(command -v "${PYTHON:-python}")
    export PYTHONPATH=$REPO
    skip env_main "cpu smoke: runs with $PY"
else
    if stage registry 30 python3 -m pip index versions vllm --timeout 5 --retries 0 --no-cache-dir; then
        REGISTRY=yes
    else
        REGISTRY=no
    fi
    export REGISTRY
    PY=python3
    stage env_main 240 bash "$SELF" --step env_main
    # Written before its import check: a stage that needs only part of the env can still run.
    if [ -e "$WORK/env.sh" ]; then . "$WORK/env.sh"; else export PYTHONPATH=$REPO; fi
fi
stage probe 60 "$PY" benchmarks/gpu_check.py probe --registry "$REGISTRY" --source .whl/SOURCE --out "$WORK/env.json"
DRYFLAG=()
[ "$DRY" = 1 ] && DRYFLAG=(--dry)
if ! stage plan 30 "$PY" benchmarks/gpu_check.py plan "${DRYFLAG[@]}" --json "$WORK/plan.json"; then
    say "no plan: nothing else can run"
else
    "$PY" benchmarks/gpu_check.py plan "${DRYFLAG[@]}" >"$WORK/plan.sh"
    . "$WORK/plan.sh"
fi

# 2. vLLM's Python, installed in the background while the HF stages run.
VLLM_PID=
if [ "$DRY" = 1 ] && [ -z "${DMR_VLLM_PYTHON:-}" ]; then
    skip env_vllm "cpu smoke: the vLLM stages need a GPU (or DMR_VLLM_PYTHON)"
elif [ -z "${DMR_VLLM_PYTHON:-}" ] && [ "$REGISTRY" != yes ] && ! env -u PYTHONPATH python3 -c 'import vllm' 2>/dev/null; then
    skip env_vllm "no vLLM on this machine and no package index to install it from (vLLM's CUDA wheel, several hundred MB with a torch of its own, is far over the 64 MiB the device tool carries)"
else
    stage env_vllm 420 bash "$SELF" --step env_vllm &
    VLLM_PID=$!
fi

if [ -n "${BF16:-}" ]; then
    COMMON=(--env "$ENV" --env-kwargs "$ENV_KWARGS" --prompt "$PROMPT" $DECODING --seed 0 --quiet)
    TEST=(--split test --n "$TEST_N" --shards "$SHARDS")

    # 3. Quantization on the GPU (llmcompressor oneshot), calibrated on expert episodes as the workflow does.
    SCHEMES=()
    # shellcheck disable=SC2086
    if stage expert 60 "$PY" -m dmr.expert --env "$ENV" --env-kwargs "$ENV_KWARGS" --episodes "$EXPERT_N" $EXPERT_FLAGS \
        --out "$WORK/expert/episodes.jsonl"; then
        for s in gptq_w4a16 awq_w4a16 gptq_w3a16; do
            stage "quantize_$s" 150 "$PY" -m dmr.quantize --model "$BF16" --scheme "$s" \
                --calibration "expert:$WORK/expert/episodes.jsonl" --samples "$CAL_SAMPLES" --max-seq-length "$CAL_LEN" \
                --prompt "$PROMPT" --out "$WORK/models/$s" && SCHEMES+=("$s")
        done
    else
        skip quantize "no calibration episodes"
    fi
    W4=
    for s in "${SCHEMES[@]}"; do [[ $s == *_w4a* ]] && W4=${W4:-$s}; done

    # 4. HF backend: the micro cell and per-step latency (timing-sensitive: before any vLLM server starts).
    stage rollout_hf_full 120 "$PY" -m dmr.agent "${COMMON[@]}" "${TEST[@]}" --model "bf16=$BF16" --policy full \
        --out "$WORK/rollouts/hf/full"
    for s in "${SCHEMES[@]}"; do
        stage "rollout_hf_$s" 120 "$PY" -m dmr.agent "${COMMON[@]}" "${TEST[@]}" --model "$s=$WORK/models/$s" \
            --policy quant --out "$WORK/rollouts/hf/quant-$s"
    done
    if [ -n "$W4" ]; then
        stage rollout_hf_random 120 "$PY" -m dmr.agent "${COMMON[@]}" "${TEST[@]}" --model "bf16=$BF16" \
            --model "$W4=$WORK/models/$W4" --policy random --p 0.5 --out "$WORK/rollouts/hf/random-$W4"
    fi
    # shellcheck disable=SC2086
    stage throughput_hf 150 "$PY" benchmarks/gpu_check.py throughput --backend hf --model "$BF16" \
        --episodes "$THRU_EPISODES" --shards $THRU_SHARDS --env-kwargs "$ENV_KWARGS" --prompt "$PROMPT" \
        --out "$WORK/throughput_hf.json"

    # 5. vLLM servers, one per precision, started in the background (once vLLM's Python is ready)
    # while the KL pool is built; never during the HF timings above.
    SERVE_PID=
    SERVE_T0=
    start_servers() {
        wait "$VLLM_PID"
        VLLM_PID=
        if [ -x "$WORK/vllm-python" ] && awk -F'\t' '$1 == "env_vllm" && $2 == "ok" {f = 1} END {exit !f}' "$WORK/stages.tsv"; then
            local models=(--model "bf16=$BF16")
            for s in "${SCHEMES[@]}"; do models+=(--model "$s=$WORK/models/$s"); done
            say "vllm_serve: starting $((${#models[@]} / 2)) servers in the background"
            SERVE_T0=$(date +%s)
            timeout -k 20 $((DEADLINE - RESERVE - $(date +%s))) "$PY" benchmarks/gpu_check.py serve "${models[@]}" \
                --python "$WORK/vllm-python" --out "$WORK/servers.json" --log-dir "$WORK/vllm-logs" \
                --gpu-memory-utilization "$GMU" --timeout 240 --extra="$VLLM_ARGS" >"$WORK/logs/vllm_serve.log" 2>&1 &
            SERVE_PID=$!
        else
            skip vllm_serve "no working vLLM (env_vllm)"
        fi
    }
    # Started now if vLLM's Python is already there, else after the HF KL stages.
    if [ -n "$VLLM_PID" ] && ! kill -0 "$VLLM_PID" 2>/dev/null; then start_servers; fi

    # 6. The KL pool (bf16 Full on train tasks) and its exact step KL per scheme on the HF backend.
    POOL_OK=
    stage pool_hf 150 "$PY" -m dmr.agent "${COMMON[@]}" --split train --n "$POOL_N" --shards "$SHARDS" \
        --model "bf16=$BF16" --policy full --out "$WORK/pool" && POOL_OK=1
    for s in "${SCHEMES[@]}"; do
        [ -n "$POOL_OK" ] || break
        stage "kl_hf_$s" 120 "$PY" -m dmr.kl --backend hf --rollout "$WORK/pool" --high "$BF16" \
            --low "$WORK/models/$s" --quant "$s" --out "$WORK/kl/hf_$s.parquet" --quiet
    done

    # 7. The same through vLLM, against the servers of servers.json.
    [ -n "$VLLM_PID" ] && start_servers
    if [ -n "$SERVE_PID" ]; then
        while kill -0 "$SERVE_PID" 2>/dev/null && ! grep -q '"done": true' "$WORK/servers.json" 2>/dev/null &&
            (($(date +%s) < DEADLINE - RESERVE)); do sleep 2; done
        served() { "$PY" -c 'import json, sys; s = json.load(open(sys.argv[1]))["servers"]; sys.exit("url" not in s.get(sys.argv[2], {}))' \
            "$WORK/servers.json" "$1" 2>/dev/null; }
        if served bf16; then
            record vllm_serve ok "" "$(($(date +%s) - SERVE_T0))" "" "servers up: see results' vLLM servers"
            VLLM=(benchmarks/gpu_check.py cli --servers "$WORK/servers.json")
            for s in "${SCHEMES[@]}"; do
                if [ -z "$POOL_OK" ] || [[ $s != *_w4a* ]]; then continue; fi
                if served "$s"; then
                    stage "kl_vllm_$s" 120 "$PY" "${VLLM[@]}" dmr.kl --backend vllm --backend-kwargs '{"top_logprobs": 20}' \
                        --rollout "$WORK/pool" --high "$BF16" --low "$WORK/models/$s" --quant "$s" \
                        --out "$WORK/kl/vllm_$s.parquet" --quiet
                else
                    skip "kl_vllm_$s" "its vLLM server did not start (results: vLLM servers)"
                fi
            done
            stage rollout_vllm_full 120 "$PY" "${VLLM[@]}" dmr.agent --backend vllm "${COMMON[@]}" "${TEST[@]}" \
                --model "bf16=$BF16" --policy full --out "$WORK/rollouts/vllm/full"
            for s in "${SCHEMES[@]}"; do
                if served "$s"; then
                    stage "rollout_vllm_$s" 120 "$PY" "${VLLM[@]}" dmr.agent --backend vllm "${COMMON[@]}" "${TEST[@]}" \
                        --model "$s=$WORK/models/$s" --policy quant --out "$WORK/rollouts/vllm/quant-$s"
                else
                    skip "rollout_vllm_$s" "its vLLM server did not start (results: vLLM servers)"
                fi
            done
            if [ -n "$W4" ] && served "$W4"; then
                stage rollout_vllm_random 120 "$PY" "${VLLM[@]}" dmr.agent --backend vllm "${COMMON[@]}" "${TEST[@]}" \
                    --model "bf16=$BF16" --model "$W4=$WORK/models/$W4" --policy random --p 0.5 \
                    --out "$WORK/rollouts/vllm/random-$W4"
            fi
            # shellcheck disable=SC2086
            stage throughput_vllm 150 "$PY" benchmarks/gpu_check.py throughput --backend vllm --servers "$WORK/servers.json" \
                --model "$BF16" --episodes "$THRU_EPISODES" --shards $THRU_SHARDS --env-kwargs "$ENV_KWARGS" \
                --prompt "$PROMPT" --out "$WORK/throughput_vllm.json"
        else
            record vllm_serve failed "" "$(($(date +%s) - SERVE_T0))" "" "the bf16 server did not start"
        fi
        kill -TERM "$SERVE_PID" 2>/dev/null
        wait "$SERVE_PID" 2>/dev/null
        # 8. dmr.agent --backend vllm starting and stopping its own server (the workflow's way).
        if served bf16; then
            OWN=$("$PY" -c 'import json, shlex, sys
print(json.dumps({"server": {"gpu_memory_utilization": float(sys.argv[1]), "python": sys.argv[2], "timeout": 240,
                             "log_dir": sys.argv[3], "extra_args": shlex.split(sys.argv[4])}}))' \
                "$GMU" "$WORK/vllm-python" "$WORK/vllm-logs/own" "$VLLM_ARGS")
            stage cli_vllm_own_server 180 "$PY" -m dmr.agent --backend vllm --backend-kwargs "$OWN" "${COMMON[@]}" \
                --split test --n "$SHARDS" --shards "$SHARDS" --model "bf16=$BF16" --policy full \
                --out "$WORK/rollouts/vllm-own/full"
        fi
    fi
fi

# 9. Gather and pack: results.{json,md} and the artefacts (no checkpoints) into $OUT.
say "gathering"
"$PY" benchmarks/gpu_check.py gather --work "$WORK" --out "$OUT" >"$WORK/logs/gather.log" 2>&1 ||
    python3 benchmarks/gpu_check.py gather --work "$WORK" --out "$OUT" >>"$WORK/logs/gather.log" 2>&1 ||
    say "gather failed: $(tail -n 3 "$WORK/logs/gather.log")"
nvidia-smi >"$WORK/logs/nvidia-smi-end.log" 2>&1
tar -czf "$OUT/artefacts.tar.gz" -C "$WORK" --exclude='*.safetensors' --exclude=./site --exclude='./venv-*' \
    --exclude=./vllm-python . 2>/dev/null
say "done in $(($(date +%s) - DEADLINE + BUDGET))s: $(ls "$OUT" | tr '\n' ' ')"
exec 1>&3 2>&4
for _ in $(seq 50); do kill -0 "$TEE_PID" 2>/dev/null || break; sleep 0.1; done
cat "$OUT/results.md" 2>/dev/null
exit 0
