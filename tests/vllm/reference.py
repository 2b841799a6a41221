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


class RecomputeEngine:
    """The evaluation runner's engine interface on the full recompute, greedy only: what the transformers engine
    computes (greedy two-stage choice, expected replaced mass), without vLLM and without a KV cache. `base` / `rl`
    modes take the argmax of that model's logits."""

    name = "recompute"
    serves_modes_together = False

    def __init__(self, recompute: Recompute, eos_sources):
        self.recompute, self.eos_sources = recompute, tuple(eos_sources)

    def check(self, modes, settings) -> None:
        assert not settings.do_sample and settings.num_samples == 1, "RecomputeEngine is greedy, one sample"

    @torch.no_grad()
    def _greedy(self, prompt, mode, max_tokens, eos):
        tokens, masses = [], []
        for _ in range(max_tokens):
            ids = torch.tensor([prompt + tokens])
            rl, base = self.recompute.rl(ids).logits[:, -1], self.recompute.base(ids).logits[:, -1]
            if mode.kind == "directional":
                scores, mass, _ = directional_step_with_replacement(rl, base, mode.config, greedy=True)
                masses.append(float(mass))
            else:
                scores = base if mode.kind == "base" else rl
            tokens.append(int(scores.argmax(-1)))
            if tokens[-1] in eos:
                break
        ratio = {"base": 0.0, "rl": 1.0}.get(mode.kind, sum(masses) / max(len(masses), 1))
        return tokens, ratio

    def generate(self, requests, settings, *, eos_token_id, pad_token_id):
        from hf_extrapolate.evaluation.generation import Responses, left_pad

        out = []
        for request in requests:
            rows = [self._greedy(list(p), request.mode, settings.max_new_tokens, list(eos_token_id))
                    for p in request.prompts]
            prompt_ids, _ = left_pad(request.prompts, pad_token_id)
            width = max(len(t) for t, _ in rows)
            response = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.bool)
            for i, (tokens, _) in enumerate(rows):
                response[i, : len(tokens)] = torch.tensor(tokens)
                mask[i, : len(tokens)] = True
            out.append(Responses(torch.cat([prompt_ids, response], 1), prompt_ids.shape[1], mask,
                                 torch.tensor([r for _, r in rows])))
        return out
