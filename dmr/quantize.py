"""Quantize a bf16 checkpoint with llmcompressor `oneshot` (paper App. E).

Schemes: `gptq_w4a16`, `awq_w4a16` (the current recipe: transform.awq.AWQModifier, then a
QuantizationModifier) and `gptq_w3a16` (3-bit, symmetric, group 128, via config_groups), plus the
general form METHOD_wBITSa16[_gGROUP][_PART[wBITS[gGROUP]]]. They target the Linear layers and ignore
lm_head. PART (`attn`: q/k/v/o_proj; `qkv`: q/k/v_proj; `o`: o_proj; `mlp`: gate/up/down_proj) mixes
bits per part of each decoder layer: alone (`rtn_w2a16_mlp`) only that part is quantized and the rest
stays at full precision; with its own bits (`rtn_w2a16_attnw3`, `..._attnw4g64`) that part takes them
(group 128 unless given) and every other projection the scheme's. The checkpoint is saved compressed
(compressed-tensors), with the recipe and the library versions next to it.

Calibration text: the paper uses 128 C4 documents of 2048 tokens. Nothing is downloaded here, so
the source is a local file (`.txt`: one document per blank-line-separated block; `.jsonl`: a
`text` field) or `expert:PATH`, the expert episodes of the embedded benchmark rendered in the
agent's prompt style.
"""
from __future__ import annotations

import argparse
import json
import re
from importlib.metadata import version
from pathlib import Path

import torch

from dmr import prompts
from dmr.expert import read_episodes
from dmr.llm.hf import HFBackend
from dmr.tokenizer import corpus

SCHEMES = ("gptq_w4a16", "awq_w4a16", "gptq_w3a16")
# Beyond the paper's three: METHOD_wBITSa16[_gGROUP][_PART[wBITS[gGROUP]]], e.g. rtn_w3a16,
# gptq_w2a16_g64 or rtn_w2a16_attnw3, for small models that the paper's schemes barely hurt (the
# paper itself moved to W3 where W4 barely hurt).
SCHEME_RE = re.compile(r"^(gptq|awq|rtn)_w([2-8])a16(?:_g(\d+))?(?:_(attn|qkv|o|mlp)(?:w([2-8])(?:g(\d+))?)?)?$")
# The Linear projections of a decoder layer (Qwen3 module names; the same in Llama-style models) and the
# parts a scheme can single out; the rest of a mixed scheme is every other projection.
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
PARTS = {"attn": PROJECTIONS[:4], "qkv": PROJECTIONS[:3], "o": PROJECTIONS[3:4], "mlp": PROJECTIONS[4:]}


def targets(projections) -> str:
    """The llmcompressor target (a module-name regex) of some projections."""
    return "re:.*(" + "|".join(re.escape(p) for p in projections) + ")$"


def _match(scheme: str) -> re.Match:
    m = SCHEME_RE.match(scheme)
    if not m:
        raise ValueError(f"unknown quantization scheme {scheme!r}; known: {SCHEMES} or "
                         "METHOD_wBITSa16[_gGROUP][_PART[wBITS[gGROUP]]] with METHOD in gptq, awq, rtn and PART "
                         f"in {', '.join(PARTS)}")
    return m


def parse_scheme(scheme: str) -> tuple[str, int, int]:
    """(method, bits, group) of the scheme's main layers."""
    m = _match(scheme)
    return m.group(1), int(m.group(2)), int(m.group(3) or 128)


def layer_groups(scheme: str) -> list[tuple[str, int, int]]:
    """(targets, bits, group) of each disjoint layer group a scheme quantizes."""
    m = _match(scheme)
    bits, group = int(m.group(2)), int(m.group(3) or 128)
    part, part_bits, part_group = m.group(4, 5, 6)
    if part is None:
        return [("Linear", bits, group)]
    if part_bits is None:
        return [(targets(PARTS[part]), bits, group)]
    rest = [p for p in PROJECTIONS if p not in PARTS[part]]
    return [(targets(rest), bits, group), (targets(PARTS[part]), int(part_bits), int(part_group or 128))]


def recipe(scheme: str):
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    method = parse_scheme(scheme)[0]
    groups = layer_groups(scheme)
    if groups == [("Linear", 4, 128)]:
        quant = {"targets": "Linear", "scheme": "W4A16", "ignore": ["lm_head"]}
    else:
        quant = {"ignore": ["lm_head"], "config_groups": {f"group_{i}": {
            "targets": [targets],
            "weights": {"num_bits": b, "type": "int", "symmetric": True, "strategy": "group", "group_size": g}}
            for i, (targets, b, g) in enumerate(groups)}}
    if method == "gptq":
        return [GPTQModifier(**quant)]
    if method == "awq":
        from llmcompressor.modifiers.transform.awq import AWQModifier

        return [AWQModifier(duo_scaling=True), QuantizationModifier(**quant)]
    return [QuantizationModifier(**quant)]  # round-to-nearest


def calibration_texts(source: str, n: int, prompt: dict | None = None) -> list[str]:
    if source.startswith("expert:"):
        texts = list(corpus(read_episodes(Path(source[7:])), prompts.get(**(prompt or {"style": "react"}))))
    else:
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(f"calibration source {source!r} does not exist")
        if path.suffix == ".jsonl":
            texts = [json.loads(line)["text"] for line in path.read_text().splitlines() if line.strip()]
        else:
            texts = [b.strip() for b in path.read_text().split("\n\n") if b.strip()]
    if len(texts) < n:
        raise ValueError(f"calibration source {source!r} has {len(texts)} texts, {n} requested")
    return texts[:n]


def _no_pin_without_accelerator():
    """AWQ's intermediate cache pins memory, which fails when no accelerator exists."""
    if torch.accelerator.is_available():
        return
    from llmcompressor.pipelines.cache import IntermediatesCache

    IntermediatesCache.pin_memory = lambda self, *a, **k: None


def quantize(model_dir: Path, scheme: str, texts: list[str], max_seq_length: int, out: Path) -> dict:
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _no_pin_without_accelerator()
    gpu = torch.cuda.is_available()
    # fp32 on a CPU: bf16 oneshot is 5-10x slower there.
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16 if gpu else torch.float32)
    tok = AutoTokenizer.from_pretrained(model_dir)
    rec = recipe(scheme)
    # In the given order: llmcompressor shuffles calibration samples with torch's unseeded global RNG
    # by default, and GPTQ's and AWQ's float sums then differ run to run, and with them the rounding
    # of borderline weights: two builds of the same scheme gave different checkpoints.
    oneshot(model=model, tokenizer=tok, dataset=Dataset.from_dict({"text": texts}), recipe=rec,
            max_seq_length=max_seq_length, num_calibration_samples=len(texts), text_column="text",
            shuffle_calibration_samples=False)
    model.to(torch.bfloat16)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, save_compressed=True)
    tok.save_pretrained(out)
    meta = {"scheme": scheme, "source_model": str(model_dir), "calibration_samples": len(texts),
            "max_seq_length": max_seq_length, "recipe": [repr(m) for m in rec],
            "versions": {p: version(p) for p in ("llmcompressor", "compressed-tensors", "transformers", "torch")}}
    meta["agreement"] = agreement(model_dir, out, texts[:16], max_seq_length)
    (out / "dmr_quantization.json").write_text(json.dumps(meta, indent=1))
    return meta


@torch.inference_mode()
def agreement(bf16_dir: Path, quant_dir: Path, texts: list[str], max_len: int) -> dict:
    """Top-1 next-token agreement and mean KL(bf16 || quant) per position on `texts`."""
    high, low = HFBackend(bf16_dir), HFBackend(quant_dir)
    same = total = 0
    kl = 0.0
    for text in texts:
        ids = torch.tensor([high.encode(text)[:max_len]])
        a = high.model(input_ids=ids).logits[0].float().log_softmax(-1)
        b = low.model(input_ids=ids).logits[0].float().log_softmax(-1)
        same += int((a.argmax(-1) == b.argmax(-1)).sum())
        total += a.shape[0]
        kl += float((a.exp() * (a - b)).sum())
    return {"top1_agreement": same / total, "mean_kl": kl / total, "positions": total}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, type=Path, help="bf16 HF checkpoint directory")
    p.add_argument("--scheme", required=True, type=lambda x: parse_scheme(x) and x,
                   help=f"{', '.join(SCHEMES)} (the paper's), or METHOD_wBITSa16[_gGROUP]")
    p.add_argument("--calibration", required=True, help="expert:EPISODES.jsonl | FILE.txt | FILE.jsonl")
    p.add_argument("--samples", type=int, default=128, help="number of calibration texts")
    p.add_argument("--max-seq-length", type=int, default=2048)
    p.add_argument("--prompt", type=json.loads, default=None, help="prompt spec for expert: sources")
    p.add_argument("--out", required=True, type=Path, help="output directory (compressed checkpoint)")
    a = p.parse_args(argv)
    meta = quantize(a.model, a.scheme, calibration_texts(a.calibration, a.samples, a.prompt), a.max_seq_length, a.out)
    print(json.dumps(meta, indent=1))


if __name__ == "__main__":
    main()
