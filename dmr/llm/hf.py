"""HF transformers backend: exact full-vocabulary scores, runs every checkpoint on CPU or GPU.

On a CPU it computes in fp32 whatever the checkpoint dtype, because bf16 matmuls are 5-10x slower
there; on a GPU it uses bf16. Compressed-tensors (llmcompressor) checkpoints load decompressed.
"""
from __future__ import annotations

from pathlib import Path

import torch

from dmr.llm.base import Generation, Sampling, Scored


class _Trie:
    """Token-id prefix tree of the allowed completions of one prompt."""

    def __init__(self, sequences: list[list[int]]):
        self.root: dict = {}
        for seq in sequences:
            node = self.root
            for t in seq:
                node = node.setdefault(t, {})

    def next_tokens(self, prefix: list[int]) -> list[int]:
        node = self.root
        for t in prefix:
            node = node.get(t)
            if node is None:
                return []
        return list(node)


class HFBackend:
    name = "hf"

    def __init__(self, model: str | Path, device: str = "auto", threads: int | None = None,
                 dtype: str = "auto"):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if threads:
            torch.set_num_threads(threads)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if dtype == "auto":
            dtype = "bfloat16" if device.startswith("cuda") else "float32"
        self.device = torch.device(device)
        self.path = str(model)
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        self.tokenizer.padding_side = "left"
        self.model = AutoModelForCausalLM.from_pretrained(self.path, dtype=getattr(torch, dtype))
        self.model.to(self.device).eval()
        self.eos_id = self.tokenizer.eos_token_id
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_id

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _left_pad(self, seqs: list[list[int]]):
        width = max(map(len, seqs))
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, width - len(s):] = torch.tensor(s)
            mask[i, width - len(s):] = 1
        return ids.to(self.device), mask.to(self.device)

    @torch.inference_mode()
    def generate(self, prompts: list[str], sampling: Sampling,
                 allowed: list[list[str]] | None = None) -> list[Generation]:
        from transformers import LogitsProcessor, LogitsProcessorList

        if not prompts:
            return []
        prompt_ids = [self.encode(p) for p in prompts]
        ids, mask = self._left_pad(prompt_ids)
        width = ids.shape[1]
        processors = LogitsProcessorList()
        if allowed is not None:
            tries = [_Trie([self.encode(c) + [self.eos_id] for c in options]) for options in allowed]
            eos = self.eos_id

            class Constrain(LogitsProcessor):
                def __call__(self, input_ids, scores):
                    masked = torch.full_like(scores, float("-inf"))
                    for i, trie in enumerate(tries):
                        nxt = trie.next_tokens(input_ids[i, width:].tolist())
                        # A finished (or unconstrained-empty) row may only emit EOS.
                        masked[i, nxt or [eos]] = 0.0
                    return scores + masked

            processors.append(Constrain())
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        greedy = sampling.temperature <= 0
        out = self.model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=sampling.max_new_tokens,
            do_sample=not greedy, temperature=None if greedy else sampling.temperature,
            top_p=None if greedy else sampling.top_p, top_k=None,
            logits_processor=processors, output_logits=True, return_dict_in_generate=True,
            eos_token_id=self.eos_id, pad_token_id=self.pad_id)
        new = out.sequences[:, width:]
        logp = torch.stack(out.logits, dim=1).float().log_softmax(-1) if out.logits else None
        results = []
        for i, p in enumerate(prompt_ids):
            toks = []
            for t in new[i].tolist():
                toks.append(t)
                if t == self.eos_id:
                    break
            lps = [logp[i, j, t].item() for j, t in enumerate(toks)] if logp is not None else []
            text = self.tokenizer.decode([t for t in toks if t != self.eos_id], skip_special_tokens=False)
            results.append(Generation(text=text, prompt_tokens=len(p), completion_tokens=len(toks),
                                      token_ids=toks, logprobs=lps))
        return results

    @torch.inference_mode()
    def score(self, prompts: list[str], continuations: list[str], full: bool = True) -> list[Scored]:
        pairs = [(self.encode(p), self.encode(c)) for p, c in zip(prompts, continuations, strict=True)]
        seqs = [p + c for p, c in pairs]
        ids, mask = self._left_pad(seqs)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = self.model(input_ids=ids, attention_mask=mask, position_ids=pos).logits.float()
        width = ids.shape[1]
        results = []
        for i, (p, c) in enumerate(pairs):
            # Positions predicting the continuation tokens: the one before each of them.
            start = width - len(c) - 1
            lp = logits[i, start:width - 1].log_softmax(-1)
            chosen = lp.gather(-1, torch.tensor(c, device=lp.device)[:, None])[:, 0]
            results.append(Scored(token_ids=c, logprobs=chosen.tolist(), dist=lp.cpu() if full else None))
        return results

    def close(self) -> None:
        self.model = None
