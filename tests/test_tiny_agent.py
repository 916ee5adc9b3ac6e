"""Behaviour-cloning loss of the tiny agent (dmr.tiny_agent): which tokens it supervises, and how much."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dmr import prompts, tiny_agent
from dmr.expert import read_episodes


@pytest.mark.parametrize("spec", [{"style": "react"}, {"style": "instruct", "window": 2}])
def test_answers_weigh_one_and_the_context_its_weight(tiny_world, spec):
    eps, tok_dir, _ = tiny_world
    tok = AutoTokenizer.from_pretrained(tok_dir)
    style = prompts.get(**spec)
    ep = read_episodes(eps)[0]
    plain = tiny_agent.encode_sequences([ep], tok, style, 4096)
    ctx = tiny_agent.encode_sequences([ep], tok, style, 4096, context_weight=0.25)
    answers = []
    noisy = spec["style"] == "react" and any(s["action"] != s["label"] for s in ep["steps"])
    for (ids, w0), (ids1, w1) in zip(plain, ctx):
        assert ids == ids1
        assert set(w0) == {0.0, 1.0} and set(w1) == {0.25, 1.0} | ({0.0} if noisy else set())
        assert [a == 1.0 for a in w0] == [b == 1.0 for b in w1]
        answers.append(tok.decode([t for t, w in zip(ids, w0) if w == 1.0]))
    # The supervised text is exactly the answers the expert labelled (noise steps are not supervised).
    supervised = [s["label"] for s in ep["steps"] if spec["style"] != "react" or s["action"] == s["label"]]
    assert "".join(answers) == "".join(style.answer(a) + ("" if spec["style"] == "react" else tok.eos_token)
                                       for a in supervised)


def test_loss_ignores_right_padding_and_weighs_tokens(tiny_world):
    """The loss runs without an attention mask: right padding must leave it unchanged."""
    eps, tok_dir, model_dir = tiny_world
    tok = AutoTokenizer.from_pretrained(tok_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    data = tiny_agent.encode_sequences(read_episodes(eps)[:3], tok, prompts.get(style="react"), 4096, 0.5)
    i = min(range(len(data)), key=lambda j: len(data[j][0]))
    ids, w = data[i]
    padded = [(ids + [tok.pad_token_id] * 50, w + [0.0] * 50)]
    with torch.no_grad():
        alone = tiny_agent.answer_loss(model, *tiny_agent.collate(data, [i], tok.pad_token_id))
        with_pads = tiny_agent.answer_loss(model, *tiny_agent.collate(padded, [0], tok.pad_token_id))
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
        ce = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="none")
    weights = torch.tensor(w[1:])
    assert torch.allclose(alone, (ce * weights).sum() / weights.sum(), atol=1e-6)
    assert torch.allclose(alone, with_pads, atol=1e-5)
    assert not torch.allclose(alone, ce[weights == 1.0].mean(), atol=1e-3)  # the context counts


def test_injected_noise_weighs_noise_weight_not_the_context(tiny_world):
    """An executed action that was injected noise is shown but learned only at `noise_weight`: at
    the context's weight the agent learned to emit the noise it was shown."""
    eps, tok_dir, _ = tiny_world
    tok = AutoTokenizer.from_pretrained(tok_dir)
    style = prompts.get(style="react")
    ep = next(e for e in read_episodes(eps) if any(s["action"] != s["label"] for s in e["steps"]))
    noise = [style.answer(s["action"]) for s in ep["steps"] if s["action"] != s["label"]]
    for noise_weight in (0.0, 0.125):
        ((ids, w),) = tiny_agent.encode_sequences([ep], tok, style, 4096, context_weight=0.5, noise_weight=noise_weight)
        shown = tok.decode([t for t, x in zip(ids, w) if x == noise_weight])
        assert shown == "".join(noise)
        assert set(w) == {noise_weight, 0.5, 1.0}
