"""Byte-level BPE tokenizer for a tiny agent, trained on the text the agent will read and write.

Saved as an HF fast tokenizer with a Qwen-style chat template, so the HF backend, llmcompressor
and vLLM all load it like any other model's tokenizer.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from dmr import prompts
from dmr.expert import read_episodes, sequences

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Answer markers are ordinary added tokens (not special) so decoded text keeps them.
MARKERS = ["<think>", "</think>", "<action>", "</action>"]


class _Plain:
    """Stands in for the not-yet-trained tokenizer: joins chat turns without a template."""

    eos_token = ""

    @staticmethod
    def apply_chat_template(messages, **_):
        return "\n".join(m["content"] for m in messages)


def corpus(episodes: list[dict], style):
    for ep in episodes:
        for seq in sequences(ep, style, _Plain):
            yield "".join(text for text, _ in seq)


def train(texts, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL + MARKERS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=None, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token=None)
    fast.add_special_tokens({"additional_special_tokens": SPECIAL[1:]})
    fast.chat_template = CHAT_TEMPLATE
    return fast


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--episodes", required=True, type=Path, help="expert episodes JSONL (dmr.expert)")
    p.add_argument("--prompt", default='{"style": "react"}', help="JSON prompt style spec (dmr.prompts)")
    p.add_argument("--vocab-size", type=int, default=1024)
    p.add_argument("--out", required=True, type=Path, help="output directory (HF tokenizer)")
    a = p.parse_args(argv)
    tok = train(corpus(read_episodes(a.episodes), prompts.get(**json.loads(a.prompt))), a.vocab_size)
    tok.save_pretrained(a.out)
    print(f"tokenizer with {len(tok)} tokens -> {a.out}")


if __name__ == "__main__":
    main()
