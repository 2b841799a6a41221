"""The independent computation the vLLM tests compare with: transformers, full recompute of every prefix (no cache)."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from hf_extrapolate.directional import directional_step_with_replacement


class Recompute:
    def __init__(self, rl_path: str, base_path: str):
        self.rl = AutoModelForCausalLM.from_pretrained(rl_path, dtype=torch.float32).eval()
        self.base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32).eval()

    @torch.no_grad()
    def steps(self, prompt: list[int], tokens: list[int], config, greedy: bool):
        """Per generated position t: (scores (V,), replaced mass M) of the step that produced tokens[t], each from a
        full forward of both models over prompt + tokens[:t]."""
        ids = torch.tensor([prompt + tokens])
        rl_logits = self.rl(ids).logits[0, len(prompt) - 1 : -1]
        base_logits = self.base(ids).logits[0, len(prompt) - 1 : -1]
        scores, mass, _ = directional_step_with_replacement(rl_logits, base_logits, config, greedy=greedy)
        return scores, mass

    @torch.no_grad()
    def greedy(self, prompt: list[int], max_tokens: int, config, eos: int = 2) -> list[int]:
        tokens: list[int] = []
        for _ in range(max_tokens):
            ids = torch.tensor([prompt + tokens])
            scores, _, _ = directional_step_with_replacement(
                self.rl(ids).logits[:, -1], self.base(ids).logits[:, -1], config, greedy=True
            )
            tokens.append(int(scores.argmax(-1)))
            if tokens[-1] == eos:
                break
        return tokens
