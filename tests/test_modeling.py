"""`DirectionalModelForCausalLM`: generate() arguments, save/load round trips, LoRA pairing (fused and fallback)."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoTokenizer, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from hf_extrapolate import DirectionalLogitsProcessor, DirectionalModelForCausalLM, ExtrapolationConfig
from tests.tiny import EOS, PAD, left_padded_batch, tiny_llama, tiny_tokenizer

CFG = ExtrapolationConfig(criterion="logp_diff", threshold=-0.1, gamma=0.1)
NEUTRAL = dict(top_k=0, top_p=1.0, temperature=1.0)


def _manual(rl, base, inputs, cfg, seed, **kw):
    proc = DirectionalLogitsProcessor(base, cfg, attention_mask=inputs["attention_mask"], do_sample=kw.get("do_sample", False),
                                      num_beams=kw.get("num_beams", 1))
    torch.manual_seed(seed)
    out = rl.generate(**inputs, **NEUTRAL, pad_token_id=PAD, logits_processor=LogitsProcessorList([proc]), **kw)
    return out, proc


def test_sampling_settings_are_written_once_and_moved_inside():
    rl, base = tiny_llama(0), tiny_llama(1)
    inputs = left_padded_batch([4, 7])
    model = DirectionalModelForCausalLM(rl, base, CFG)
    torch.manual_seed(3)
    ours = model.generate(**inputs, do_sample=True, top_p=0.7, temperature=0.8, top_k=20, max_new_tokens=10,
                          pad_token_id=PAD, return_dict_in_generate=True)
    manual, proc = _manual(rl, base, inputs, CFG.replace(top_p=0.7, temperature=0.8, top_k=20), 3,
                           do_sample=True, max_new_tokens=10)
    assert torch.equal(ours.sequences, manual)
    torch.testing.assert_close(ours.replace_ratio, proc.replace_ratio(manual))
    torch.testing.assert_close(model.last_replace_ratio, ours.replace_ratio)
    assert ours.replaced_token_probability.shape == (2, 10)


def test_config_warpers_become_default_sampling_settings_and_user_objects_untouched():
    rl, base = tiny_llama(0), tiny_llama(1)
    rl_gen_before = rl.generation_config.to_dict()
    rl_cfg_before = rl.config.to_dict()
    model = DirectionalModelForCausalLM(rl, base, CFG.replace(top_p=0.6))
    assert model.generation_config.top_p == 0.6
    inputs = left_padded_batch([5])
    torch.manual_seed(0)
    ours = model.generate(**inputs, do_sample=True, top_k=0, max_new_tokens=6, pad_token_id=PAD)
    manual, _ = _manual(rl, base, inputs, CFG.replace(top_p=0.6), 0, do_sample=True, max_new_tokens=6)
    assert torch.equal(ours, manual)
    assert rl.generation_config.to_dict() == rl_gen_before and rl.config.to_dict() == rl_cfg_before


def test_per_call_override_and_invariance():
    rl, base = tiny_llama(0), tiny_llama(1)
    inputs = left_padded_batch([4, 6])
    model = DirectionalModelForCausalLM(rl, base, CFG)
    ours = model.generate(**inputs, max_new_tokens=8, pad_token_id=PAD,
                          extrapolation_config=ExtrapolationConfig(criterion="never", proposal="rl"))
    assert torch.equal(ours, rl.generate(**inputs, max_new_tokens=8, pad_token_id=PAD))
    assert torch.equal(model.last_replace_ratio, torch.zeros(2))


class Collect(BaseStreamer):
    def __init__(self):
        self.chunks = []
        self.ended = False

    def put(self, value):
        self.chunks.append(value.clone())

    def end(self):
        self.ended = True


class StopAt(StoppingCriteria):
    def __init__(self, length):
        self.length = length

    def __call__(self, input_ids, scores, **kw):
        return torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.length, dtype=torch.bool)


def test_usual_generate_arguments():
    rl, base, assistant = tiny_llama(0), tiny_llama(1), tiny_llama(2)
    inputs = left_padded_batch([4, 6])
    model = DirectionalModelForCausalLM(rl, base, CFG)
    width = inputs["input_ids"].shape[1]
    # streamer + stopping criteria
    streamer = Collect()
    out = model.generate(**{k: v[:1] for k, v in inputs.items()}, streamer=streamer,
                         stopping_criteria=StoppingCriteriaList([StopAt(width + 5)]), max_new_tokens=20, pad_token_id=PAD)
    assert out.shape[1] == width + 5 and streamer.ended and len(streamer.chunks) == 6
    # generation_config object
    gen = model.generation_config.__class__(max_new_tokens=4, do_sample=False, pad_token_id=PAD)
    assert model.generate(**inputs, generation_config=gen).shape[1] == width + 4
    # beam search with several return sequences: same as the processor with num_beams
    ours = model.generate(**inputs, num_beams=3, num_return_sequences=2, max_new_tokens=6, pad_token_id=PAD)
    manual, _ = _manual(rl, base, inputs, CFG, 0, num_beams=3, num_return_sequences=2, max_new_tokens=6)
    assert torch.equal(ours, manual)
    assert model.last_replace_ratio.shape == (6,)  # the live beams
    # assisted decoding
    one = {k: v[:1] for k, v in inputs.items()}
    ours = model.generate(**one, assistant_model=assistant, max_new_tokens=8, pad_token_id=PAD)
    manual, _ = _manual(rl, base, one, CFG, 0, max_new_tokens=8)
    assert torch.equal(ours, manual)
    # num_return_sequences with sampling
    torch.manual_seed(1)
    out = model.generate(**inputs, do_sample=True, num_return_sequences=3, max_new_tokens=5, pad_token_id=PAD,
                         return_dict_in_generate=True, output_scores=True)
    assert out.sequences.shape[0] == 6 and out.replace_ratio.shape == (6,) and len(out.scores) == 5


def test_unsupported_warper_is_refused():
    model = DirectionalModelForCausalLM(tiny_llama(0), tiny_llama(1), CFG)
    with pytest.raises(ValueError, match="min_p"):
        model.generate(**left_padded_batch([3]), do_sample=True, min_p=0.1, max_new_tokens=2, pad_token_id=PAD)


def _save_model(model, tokenizer, path):
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_from_pretrained_save_and_restore_pair(tmp_path):
    tok = tiny_tokenizer()
    rl_dir = _save_model(tiny_llama(0), tok, tmp_path / "rl")
    base_dir = _save_model(tiny_llama(1), tok, tmp_path / "base")
    model = DirectionalModelForCausalLM.from_pretrained(rl_dir, base_model=base_dir, extrapolation_config=CFG,
                                                        torch_dtype=torch.float32)
    assert model.reference_model.dtype == torch.float32 and model.vocab_size == len(tok)
    n_rl = sum(p.numel() for p in model.rl_model.parameters())
    assert sum(p.numel() for p in model.parameters()) == n_rl  # the base is not a submodule
    assert not any(k.startswith("_reference_model") for k in model.state_dict())
    inputs = left_padded_batch([3, 5])
    first = model.generate(**inputs, max_new_tokens=8, pad_token_id=PAD)

    pair_dir = tmp_path / "pair"
    model.save_pretrained(pair_dir)
    record = json.loads((pair_dir / "extrapolation_config.json").read_text())
    assert list(record) == sorted(record) and record["base_model_name_or_path"] == base_dir
    assert record["extrapolation_config"] == CFG.to_dict() and "hf_extrapolate_version" in record
    weights = sum(os.path.getsize(pair_dir / f) for f in os.listdir(pair_dir) if f.endswith(".safetensors"))
    assert weights < 1.5 * n_rl * 4  # the RL weights only, never the base's
    restored = DirectionalModelForCausalLM.from_pretrained(pair_dir)
    assert restored.extrapolation_config == CFG
    assert torch.equal(restored.generate(**inputs, max_new_tokens=8, pad_token_id=PAD), first)


def test_mismatched_tokenizers_are_refused(tmp_path):
    rl_dir = _save_model(tiny_llama(0), tiny_tokenizer(), tmp_path / "rl")
    base_dir = _save_model(tiny_llama(1), tiny_tokenizer(shift=1), tmp_path / "base")
    with pytest.raises(ValueError, match="different tokenizers"):
        DirectionalModelForCausalLM.from_pretrained(rl_dir, base_model=base_dir)
    with pytest.raises(ValueError, match="base_model"):
        DirectionalModelForCausalLM.from_pretrained(rl_dir)


# ---------------------------------------------------------------------------- LoRA
def _lora(seed=3, **kw):
    torch.manual_seed(seed)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "up_proj"], init_lora_weights=False, **kw)
    return get_peft_model(tiny_llama(seed), cfg).eval()


def _scores(model, inputs, **kw):
    out = model.generate(**inputs, max_new_tokens=8, pad_token_id=PAD, return_dict_in_generate=True,
                         output_scores=True, **kw)
    return out.sequences, torch.stack(out.scores, 1).softmax(-1)


@pytest.mark.parametrize("kw", [dict(), dict(do_sample=True, top_p=0.9), dict(do_sample=True, num_return_sequences=2)],
                         ids=["greedy", "sample", "sample-nrs2"])
def test_lora_pair_equals_merged_rl_and_separate_base(kw):
    peft_model = _lora()
    inputs = left_padded_batch([4, 7, 2])
    merged = copy.deepcopy(peft_model).merge_and_unload()
    reference = DirectionalModelForCausalLM(merged, _unlora(peft_model), CFG)
    results = {}
    for strategy in ("fused", "fallback"):
        model = DirectionalModelForCausalLM.from_peft(peft_model, CFG, lora_strategy=strategy)
        torch.manual_seed(5)
        results[strategy] = _scores(model, inputs, **kw)
        used = type(model.last_processor.reference).__name__
        assert used == {"fused": "FusedLoRAReference", "fallback": "ReferenceModel"}[strategy]
    torch.manual_seed(5)
    results["separate"] = _scores(reference, inputs, **kw)
    for strategy in ("fused", "fallback"):
        seq, probs = results[strategy]
        if not kw.get("do_sample"):
            assert torch.equal(seq, results["separate"][0])
        assert torch.equal(seq, results["fallback"][0])
        torch.testing.assert_close(probs, results["separate"][1], atol=1e-5, rtol=0)
    # the PEFT model is left as it was: no hooks, adapters enabled
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in peft_model.modules())
    assert not any(getattr(m, "_disable_adapters", False) for m in peft_model.modules())


def _unlora(peft_model):
    """An independent plain base model: the PEFT model's base weights copied into a fresh LlamaForCausalLM."""
    fresh = tiny_llama(99)
    state = {
        k.replace("base_model.model.", "").replace(".base_layer", ""): v.clone()
        for k, v in peft_model.state_dict().items()
        if "lora_" not in k
    }
    fresh.load_state_dict(state, strict=True)
    return fresh


def test_lora_adapter_folder_loads_its_base_once(tmp_path):
    tok = tiny_tokenizer()
    base_dir = _save_model(tiny_llama(3), tok, tmp_path / "base")
    torch.manual_seed(3)
    base = tiny_llama(3)
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.peft_config["default"].base_model_name_or_path = base_dir
    peft_model.save_pretrained(tmp_path / "adapter")
    model = DirectionalModelForCausalLM.from_pretrained(tmp_path / "adapter", extrapolation_config=CFG)
    assert isinstance(model.rl_model, PeftModel) and model.reference_model is model.rl_model
    ptrs = [p.data_ptr() for n, p in model.rl_model.named_parameters() if "lora_" not in n]
    assert len(ptrs) == len(set(ptrs)) == len(list(tiny_llama(3).parameters()))  # one storage per base weight
    inputs = left_padded_batch([3, 6])
    first = model.generate(**inputs, max_new_tokens=6, pad_token_id=PAD)
    model.save_pretrained(tmp_path / "pair")
    assert (tmp_path / "pair" / "adapter_config.json").exists()
    again = DirectionalModelForCausalLM.from_pretrained(tmp_path / "pair")
    assert again.extrapolation_config == CFG
    assert torch.equal(again.generate(**inputs, max_new_tokens=6, pad_token_id=PAD), first)


def test_lora_strategy_selection_and_errors():
    peft_model = _lora()
    model = DirectionalModelForCausalLM.from_peft(peft_model, CFG)
    inputs = left_padded_batch([3, 5])
    model.generate(**inputs, num_beams=2, max_new_tokens=3, pad_token_id=PAD)  # auto falls back for beams
    fused = DirectionalModelForCausalLM.from_peft(peft_model, CFG, lora_strategy="fused")
    with pytest.raises(ValueError, match="beam"):
        fused.generate(**inputs, num_beams=2, max_new_tokens=3, pad_token_id=PAD)
    merged = _lora()
    merged.merge_adapter()
    with pytest.raises(ValueError, match="merged"):
        DirectionalModelForCausalLM.from_peft(merged, CFG)
    with pytest.raises(ValueError, match="base_model"):
        DirectionalModelForCausalLM(tiny_llama(0))
    with pytest.raises(ValueError, match="lora_strategy"):
        DirectionalModelForCausalLM.from_peft(peft_model, CFG, lora_strategy="both")


def test_dora_uses_the_fallback_and_matches_merged():
    peft_model = _lora(use_dora=True)
    model = DirectionalModelForCausalLM.from_peft(peft_model, CFG)
    inputs = left_padded_batch([3, 5])
    seq, probs = _scores(model, inputs)
    ref_seq, ref_probs = _scores(DirectionalModelForCausalLM(copy.deepcopy(peft_model).merge_and_unload(), _unlora(peft_model), CFG), inputs)
    assert torch.equal(seq, ref_seq)
    torch.testing.assert_close(probs, ref_probs, atol=1e-5, rtol=0)


def test_hooks_removed_even_when_generate_raises():
    peft_model = _lora()
    model = DirectionalModelForCausalLM.from_peft(peft_model, CFG, lora_strategy="fused")

    class Boom(StoppingCriteria):
        def __call__(self, *a, **k):
            raise KeyError("boom")

    with pytest.raises(KeyError):
        model.generate(**left_padded_batch([3]), stopping_criteria=StoppingCriteriaList([Boom()]), max_new_tokens=3,
                       pad_token_id=PAD)
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in peft_model.modules())


# ---------------------------------------------------------------------------- saving / reloading other architectures
def _tiny_qwen2(seed):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    return Qwen2ForCausalLM(Qwen2Config(
        vocab_size=72, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, bos_token_id=1, eos_token_id=EOS, pad_token_id=PAD, tie_word_embeddings=False,
    )).eval()


def _tiny_gemma3(seed):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    return Gemma3ForCausalLM(Gemma3TextConfig(
        vocab_size=72, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, bos_token_id=1, eos_token_id=EOS, pad_token_id=PAD,
    )).eval()


@pytest.mark.parametrize("build", [_tiny_qwen2, _tiny_gemma3], ids=["qwen2", "gemma3"])
@pytest.mark.parametrize("with_tokenizer", [True, False], ids=["tokenizer", "no-tokenizer"])
def test_saved_pair_reloads_for_qwen2_and_gemma3(tmp_path, build, with_tokenizer):
    """transformers returns an empty stand-in tokenizer for these folders without tokenizer files: it is never
    compared, the RL tokenizer is saved with the pair, and the pair reloads with the same greedy output."""
    tok = tiny_tokenizer()
    rl_dir, base_dir = tmp_path / "rl", tmp_path / "base"
    build(0).save_pretrained(rl_dir)
    build(1).save_pretrained(base_dir)
    if with_tokenizer:
        tok.save_pretrained(rl_dir)
        tok.save_pretrained(base_dir)
    model = DirectionalModelForCausalLM.from_pretrained(rl_dir, base_model=base_dir, extrapolation_config=CFG)
    # the tokenizer as transformers loads it for this model type (72 logits, 64 + the type's extra tokens)
    size = len(AutoTokenizer.from_pretrained(rl_dir)) if with_tokenizer else None
    assert model.vocab_size == size and (size is None or 64 <= size < 72)
    inputs = left_padded_batch([3, 5])
    first = model.generate(**inputs, max_new_tokens=8, pad_token_id=PAD)
    model.save_pretrained(tmp_path / "pair")
    record = json.loads((tmp_path / "pair" / "extrapolation_config.json").read_text())
    assert record["vocab_size"] == record["tokenizer_size"] == size
    assert (tmp_path / "pair" / "tokenizer.json").exists() == with_tokenizer
    for check in (True, False):
        restored = DirectionalModelForCausalLM.from_pretrained(tmp_path / "pair", check_tokenizers=check)
        assert restored.vocab_size == model.vocab_size
        assert torch.equal(restored.generate(**inputs, max_new_tokens=8, pad_token_id=PAD), first)
    if with_tokenizer:  # the check still refuses a different real tokenizer
        tiny_tokenizer(shift=1).save_pretrained(base_dir)
        with pytest.raises(ValueError, match="different tokenizers"):
            DirectionalModelForCausalLM.from_pretrained(tmp_path / "pair")


def test_in_memory_pair_is_refused_at_save_or_saved_with_its_base(tmp_path):
    model = DirectionalModelForCausalLM.from_models(tiny_llama(0), tiny_llama(1), CFG)
    with pytest.raises(ValueError, match="save_base=True"):
        model.save_pretrained(tmp_path / "refused")
    assert not (tmp_path / "refused").exists()  # nothing half-written
    inputs = left_padded_batch([3, 5])
    first = model.generate(**inputs, max_new_tokens=8, pad_token_id=PAD)
    model.save_pretrained(tmp_path / "pair", save_base=True)
    record = json.loads((tmp_path / "pair" / "extrapolation_config.json").read_text())
    assert record["base_model_subfolder"] == "base" and record["base_model_name_or_path"] is None
    restored = DirectionalModelForCausalLM.from_pretrained(tmp_path / "pair")
    assert torch.equal(restored.generate(**inputs, max_new_tokens=8, pad_token_id=PAD), first)
    # the pair folder moves as a whole
    os.rename(tmp_path / "pair", tmp_path / "moved")
    moved = DirectionalModelForCausalLM.from_pretrained(tmp_path / "moved")
    assert torch.equal(moved.generate(**inputs, max_new_tokens=8, pad_token_id=PAD), first)


def test_relative_base_path_is_stored_absolute_and_bad_records_name_the_file(tmp_path, monkeypatch):
    tok = tiny_tokenizer()
    _save_model(tiny_llama(0), tok, tmp_path / "rl")
    _save_model(tiny_llama(1), tok, tmp_path / "base")
    monkeypatch.chdir(tmp_path)
    model = DirectionalModelForCausalLM.from_pretrained("rl", base_model="base", extrapolation_config=CFG)
    model.save_pretrained("pair")
    record_file = tmp_path / "pair" / "extrapolation_config.json"
    assert json.loads(record_file.read_text())["base_model_name_or_path"] == str(tmp_path / "base")
    inputs = left_padded_batch([4])
    first = model.generate(**inputs, max_new_tokens=6, pad_token_id=PAD)
    monkeypatch.chdir(tmp_path / "rl")  # another working directory
    again = DirectionalModelForCausalLM.from_pretrained(tmp_path / "pair")
    assert torch.equal(again.generate(**inputs, max_new_tokens=6, pad_token_id=PAD), first)

    good = record_file.read_text()
    record_file.write_text(good[: len(good) // 2])
    with pytest.raises(ValueError, match="extrapolation_config.json is not valid JSON"):
        DirectionalModelForCausalLM.from_pretrained(tmp_path / "pair")
    record_file.write_text(json.dumps({"base_model_name_or_path": str(tmp_path / "base")}))
    with pytest.raises(ValueError, match="no 'extrapolation_config'"):
        DirectionalModelForCausalLM.from_pretrained(tmp_path / "pair")
    record_file.write_text(good)
    os.rename(tmp_path / "base", tmp_path / "base-moved")
    with pytest.raises(ValueError, match="does not exist .*base_model="):
        DirectionalModelForCausalLM.from_pretrained(tmp_path / "pair")
    moved = DirectionalModelForCausalLM.from_pretrained(tmp_path / "pair", base_model=tmp_path / "base-moved")
    assert torch.equal(moved.generate(**inputs, max_new_tokens=6, pad_token_id=PAD), first)
