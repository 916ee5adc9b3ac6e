"""Real llmcompressor oneshot on the tiny agent: every scheme saves a compressed-tensors
checkpoint that the HF backend reloads and runs, and that differs from bf16."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml

from dmr import envs, quantize
from dmr.llm import Sampling, load
from dmr.prompts import Episode, get

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def prompt_and_bf16(tiny_world):
    _, _, model = tiny_world
    b = load("hf", str(model), threads=1)
    env = envs.make("household")
    obs = env.reset(env.tasks("test", 1)[0])
    style = get("react")
    return style.render(b.tokenizer, Episode(obs.goal, obs.text, [], obs.admissible)), obs, b


@pytest.mark.parametrize("scheme,bits", [("gptq_w4a16", 4), ("awq_w4a16", 4), ("gptq_w3a16", 3), ("rtn_w2a16", 2)])
def test_scheme_roundtrip(tiny_world, prompt_and_bf16, tmp_path, scheme, bits):
    eps, _, model = tiny_world
    texts = quantize.calibration_texts(f"expert:{eps}", 8, {"style": "react"})
    out = tmp_path / scheme
    meta = quantize.quantize(model, scheme, texts, 256, out)
    cfg = json.loads((out / "config.json").read_text())
    q = cfg["quantization_config"]
    assert q["quant_method"] == "compressed-tensors" and q["format"] == "pack-quantized"
    (group,) = q["config_groups"].values()
    assert group["weights"]["num_bits"] == bits and group["weights"]["group_size"] == 128
    assert "lm_head" in q["ignore"]
    saved = json.loads((out / "dmr_quantization.json").read_text())
    assert meta["versions"]["llmcompressor"] == saved["versions"]["llmcompressor"]
    agree = json.loads((out / "dmr_quantization.json").read_text())["agreement"]
    print(f"{scheme}: top-1 next-token agreement with bf16 {agree['top1_agreement']:.3f}, "
          f"mean KL {agree['mean_kl']:.2e} over {agree['positions']} positions")
    assert 0.3 < agree["top1_agreement"] <= 1.0 and agree["mean_kl"] > 0
    prompt, obs, high = prompt_and_bf16
    low = load("hf", str(out), threads=1)
    style = get("react")
    g = low.generate([prompt], Sampling(max_new_tokens=30, stop=style.stop), [[style.answer(a) for a in obs.admissible]])[0]
    assert style.parse(g.text) in obs.admissible
    a, b = high.score([prompt], [g.text])[0], low.score([prompt], [g.text])[0]
    kl = torch.nn.functional.kl_div(b.dist, a.dist, log_target=True, reduction="none").sum(-1)
    assert torch.isfinite(kl).all() and kl.sum() > 0, "quantization must change the distribution"


@pytest.mark.parametrize("scheme", ["gptq_w4a16", "awq_w4a16"])
def test_quantization_is_deterministic(tiny_world, tmp_path, scheme):
    # The same inputs give the same checkpoint, whatever the global RNG's state (llmcompressor
    # would shuffle the calibration samples with it).
    eps, _, model = tiny_world
    texts = quantize.calibration_texts(f"expert:{eps}", 32, {"style": "react"})
    weights = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        quantize.quantize(model, scheme, texts, 256, tmp_path / f"q{seed}")
        weights.append((tmp_path / f"q{seed}" / "model.safetensors").read_bytes())
    assert weights[0] == weights[1]


def test_calibration_sources(tmp_path, tiny_world):
    eps, _, _ = tiny_world
    txt = tmp_path / "c.txt"
    txt.write_text("doc one\n\ndoc two\n\n\ndoc three\n")
    assert quantize.calibration_texts(str(txt), 3) == ["doc one", "doc two", "doc three"]
    jl = tmp_path / "c.jsonl"
    jl.write_text('{"text": "a"}\n{"text": "b"}\n')
    assert quantize.calibration_texts(str(jl), 2) == ["a", "b"]
    with pytest.raises(ValueError, match="has 2 texts, 5 requested"):
        quantize.calibration_texts(str(jl), 5)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        quantize.calibration_texts(str(tmp_path / "missing.txt"), 1)
    assert quantize.calibration_texts(f"expert:{eps}", 2)[0].startswith("Your task is to:")
    with pytest.raises(ValueError, match="unknown quantization scheme"):
        quantize.recipe("int2")
    assert quantize.parse_scheme("gptq_w3a16") == ("gptq", 3, 128)
    assert quantize.parse_scheme("rtn_w2a16_g64") == ("rtn", 2, 64)


def test_mixed_bit_schemes_name_disjoint_layer_groups():
    """`_PART` quantizes one part only; `_PARTwBITS[gGROUP]` gives that part its own bits and every other
    projection the scheme's; a bad part or a part's bad bits is refused by name."""
    t = quantize.targets
    attn, mlp = t(quantize.PARTS["attn"]), t(quantize.PARTS["mlp"])
    assert quantize.layer_groups("gptq_w3a16") == [("Linear", 3, 128)]
    assert quantize.layer_groups("rtn_w2a16_mlp") == [(mlp, 2, 128)]
    assert quantize.layer_groups("rtn_w2a16_g32_attn") == [(attn, 2, 32)]
    assert quantize.layer_groups("rtn_w2a16_attnw3") == [(mlp, 2, 128), (attn, 3, 128)]
    assert quantize.layer_groups("gptq_w2a16_g64_mlpw4g32") == [(attn, 2, 64), (mlp, 4, 32)]
    # qkv at 3 bits: o_proj joins the MLP at the scheme's 2 bits
    rest, qkv = quantize.layer_groups("rtn_w2a16_qkvw3")
    assert qkv == (t(quantize.PARTS["qkv"]), 3, 128) and rest[1:] == (2, 128)
    for name, regex in (("self_attn.o_proj", rest[0]), ("mlp.up_proj", rest[0]), ("self_attn.k_proj", qkv[0])):
        assert re.match(regex[3:], f"model.layers.3.{name}")
    assert not re.match(rest[0][3:], "model.layers.3.self_attn.q_proj")
    assert quantize.parse_scheme("rtn_w2a16_attnw3") == ("rtn", 2, 128)
    for bad in ("rtn_w2a16_ffn", "rtn_w2a16_attnw9", "rtn_w2a16_attn_mlp", "rtn_w2a16_attnw3g", "rtn_w2a16_qw3"):
        with pytest.raises(ValueError, match="unknown quantization scheme"):
            quantize.parse_scheme(bad)


def test_config_schema_spells_schemes_as_quantize_parses_them():
    """The schema's scheme pattern (which also constrains quantize.smk's wildcard) accepts exactly the
    names dmr.quantize parses."""
    pattern = yaml.safe_load((ROOT / "workflow/schemas/config.schema.yaml").read_text())["$defs"]["scheme"]["pattern"]
    for name in ("gptq_w4a16", "rtn_w2a16_g32", "rtn_w2a16_qkvw3", "awq_w3a16_g64_ow2g32", "rtn_w2a16_mlp",
                 "rtn_w2a16_ffn", "rtn_w9a16", "rtn_w2a16_attnw3g", "int4", "rtn_w2a16_o_mlp"):
        assert bool(re.match(pattern, name)) == bool(quantize.SCHEME_RE.match(name)), name


def test_mixed_bit_scheme_quantizes_each_kind_at_its_bits(tmp_path, tiny_world):
    """The real llmcompressor run: `rtn_w2a16_attnw3` leaves attention at 3 bits and the MLP at 2, and
    `rtn_w2a16_mlp` leaves attention unquantized."""
    eps, _, model = tiny_world
    texts = quantize.calibration_texts(f"expert:{eps}", 4)
    for scheme, expect in (("rtn_w2a16_attnw3", {"attn": 3, "mlp": 2}), ("rtn_w2a16_mlp", {"attn": None, "mlp": 2})):
        quantize.quantize(model, scheme, texts, 128, tmp_path / scheme)
        cfg = json.loads((tmp_path / scheme / "config.json").read_text())["quantization_config"]
        bits = {}
        for g in cfg["config_groups"].values():
            for t in g["targets"]:
                kind = next(k for k, v in quantize.PARTS.items() if quantize.targets(v) == t)
                bits[kind] = g["weights"]["num_bits"]
        assert {k: bits.get(k) for k in expect} == expect
    from safetensors import safe_open

    with safe_open(tmp_path / "rtn_w2a16_mlp" / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert any(k.endswith("self_attn.q_proj.weight") for k in keys)  # attention stays as it was
    assert not any(k.endswith("self_attn.q_proj.weight_packed") for k in keys)
    assert any(k.endswith("mlp.down_proj.weight_packed") for k in keys)


def test_score_equals_full_forward(prompt_and_bf16):
    """score() of a continuation is exactly the log-probs a plain full forward pass gives."""
    prompt, obs, b = prompt_and_bf16
    cont = " " + obs.admissible[0] + "\n"
    p, c = b.encode(prompt), b.encode(cont)
    with torch.no_grad():
        logits = b.model(input_ids=torch.tensor([p + c])).logits[0].float().log_softmax(-1)
    expected = [logits[len(p) - 1 + i, t].item() for i, t in enumerate(c)]
    scored = b.score([prompt, "short"], [cont, cont])[0]  # batched with a shorter, padded row
    assert scored.token_ids == c
    assert scored.logprobs == pytest.approx(expected, abs=1e-4)
