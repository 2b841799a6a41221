"""`ReferenceModel` against a full recompute without cache, driven by hand: rollbacks, re-verification, beam
reordering, sliding-window caches and out-of-step detection."""

from __future__ import annotations

import pytest
import torch
from transformers import MistralConfig, MistralForCausalLM

from hf_extrapolate import ReferenceModel
from tests.test_processor_generate import full_prefix_logits
from tests.tiny import left_padded_batch, tiny_gpt2, tiny_llama


def _walk(model, lengths, rows=2, seed=0):
    """Call the reference on prefixes of one random token matrix with the given lengths; compare every call."""
    inputs = left_padded_batch([5, 3][:rows] if rows <= 2 else [5] * rows, seed=seed)
    g = torch.Generator().manual_seed(seed)
    tokens = torch.cat([inputs["input_ids"], torch.randint(3, 64, (rows, max(lengths)), generator=g)], dim=1)
    ref = ReferenceModel(model, inputs["attention_mask"])
    width = inputs["input_ids"].shape[1]
    for n in lengths:
        ids = tokens[:, : width + n]
        torch.testing.assert_close(ref(ids), full_prefix_logits(model, ids, inputs["attention_mask"]), atol=1e-5, rtol=0)
    return ref


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_rollbacks_and_reverification_match_full_recompute(make):
    # assisted-decoding shape: drafts evaluated, some rejected, prefixes re-verified, then a new prompt-length call
    ref = _walk(make(1), [0, 1, 2, 3, 4, 2, 3, 4, 5, 6, 7, 4, 5, 5, 9, 0, 1])
    assert ref.stats["rollback"] >= 2 and ref.stats["prefill"] == 1


def test_sliding_window_cache_is_rebuilt_when_it_cannot_be_cropped():
    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, sliding_window=4, max_position_embeddings=128, pad_token_id=0)
    model = MistralForCausalLM(cfg).eval()
    ref = _walk(model, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 6, 7, 8, 12, 13], rows=1)
    assert ref.stats["rebuild"] >= 1


def test_beam_rows_are_rematched_to_their_parents():
    model = tiny_llama(1)
    inputs = left_padded_batch([5, 3])
    beams = 3
    mask = inputs["attention_mask"]
    ids = inputs["input_ids"].repeat_interleave(beams, dim=0)
    ref = ReferenceModel(model, mask, num_beams=beams)
    g = torch.Generator().manual_seed(0)
    ref(ids)
    for _ in range(6):
        # each beam continues a random parent beam of its own batch element
        parents = torch.randint(0, beams, (2, beams), generator=g) + torch.arange(2)[:, None] * beams
        previous = ids
        ids = torch.cat([ids[parents.flatten()], torch.randint(3, 64, (2 * beams, 1), generator=g)], dim=1)
        torch.testing.assert_close(ref(ids), full_prefix_logits(model, ids, mask), atol=1e-5, rtol=0)
        # the matched parent has the true parent's tokens (identical beams are interchangeable)
        assert torch.equal(previous[ref.last_reorder], previous[parents.flatten()])


def test_out_of_step_prefix_raises_instead_of_returning_wrong_logits():
    model = tiny_llama(1)
    inputs = left_padded_batch([4, 4])
    ref = ReferenceModel(model, inputs["attention_mask"])
    ids = torch.cat([inputs["input_ids"], torch.full((2, 1), 7)], dim=1)
    ref(inputs["input_ids"])
    ref(ids)
    forged = ids.clone()
    forged[0, 2] = 9  # an earlier token changed, length grew by one: not a continuation
    with pytest.raises(RuntimeError, match="out of step"):
        ref(torch.cat([forged, torch.full((2, 1), 5)], dim=1))
