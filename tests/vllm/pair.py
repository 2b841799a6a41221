"""A tiny base/RL Llama pair saved as checkpoints that vLLM's CPU backend accepts (head_dim 64, fp32)."""

from __future__ import annotations

import os

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hf_extrapolate.toy.tokenizer import build_toy_tokenizer


def tiny_config(vocab_size: int, **overrides) -> LlamaConfig:
    cfg = dict(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, head_dim=64, max_position_embeddings=1024, bos_token_id=1, eos_token_id=2,
        pad_token_id=0, tie_word_embeddings=False, initializer_range=0.2, dtype="float32",
    )
    cfg.update(overrides)
    return LlamaConfig(**cfg)


def save_pair(root: str, seed: int = 0) -> tuple[str, str]:
    """`(rl_dir, base_dir)`: a random base and an "RL" model whose weights moved from it (peaked distributions, so
    that Δlogp spreads around 0 and the criterion fires on some tokens and not others)."""
    tok = build_toy_tokenizer()
    torch.manual_seed(seed)
    base = LlamaForCausalLM(tiny_config(len(tok))).eval()
    rl = LlamaForCausalLM(tiny_config(len(tok))).eval()
    rl.load_state_dict(base.state_dict())
    with torch.no_grad():
        for p in rl.parameters():
            p.add_(0.1 * p.std() * torch.randn_like(p))
    paths = []
    for name, model in (("rl", rl), ("base", base)):
        path = os.path.join(root, name)
        model.save_pretrained(path)
        tok.save_pretrained(path)
        paths.append(path)
    return paths[0], paths[1]
