"""Tiny random models built from configs (no hub), shared by the test modules."""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

VOCAB = 64
EOS = 2
PAD = 0


def tiny_llama(seed: int = 0, vocab_size: int = VOCAB, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=EOS,
        pad_token_id=PAD,
        tie_word_embeddings=False,
    )
    cfg.update(overrides)
    model = LlamaForCausalLM(LlamaConfig(**cfg)).eval()
    return model


def tiny_gpt2(seed: int = 0, vocab_size: int = VOCAB, **overrides) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = dict(
        vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=256,
        bos_token_id=1, eos_token_id=EOS, pad_token_id=PAD,
    )
    cfg.update(overrides)
    return GPT2LMHeadModel(GPT2Config(**cfg)).eval()


def left_padded_batch(lengths: list[int], seed: int = 0, vocab_size: int = VOCAB) -> dict[str, torch.Tensor]:
    """A left-padded batch of random prompts (token ids >= 3, so no special tokens inside)."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), PAD, dtype=torch.long)
    mask = torch.zeros((len(lengths), width), dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, width - n:] = torch.randint(3, vocab_size, (n,), generator=g)
        mask[i, width - n:] = 1
    return {"input_ids": ids, "attention_mask": mask}


def tiny_tokenizer(vocab_size: int = VOCAB, shift: int = 0):
    """A word-level tokenizer over `vocab_size` tokens: <pad>, <bos>, <eos>, then w3, w4, ... (ids = positions).

    `shift` renames the words (same size, different tokens) to build a mismatching tokenizer.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": PAD, "<bos>": 1, "<eos>": EOS}
    for i in range(3, vocab_size):
        vocab[f"w{i + shift}"] = i
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", padding_side="left",
        chat_template="{% for m in messages %}{{ m['content'] }} {% endfor %}",
    )
