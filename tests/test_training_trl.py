"""`DirectionalGRPOTrainer` end to end on CPU: a tiny Llama, a word-level tokenizer and a tiny verifiable reward.

The key property: on one step's real batch, the reweighted DAPO loss differs from TRL's plain DAPO loss exactly as
Eq. 8 says, token by token, and its gradient is that of a loss with constant weights (p_old carries no gradient).
"""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from torch.testing import assert_close

pytest.importorskip("trl")
pytest.importorskip("datasets")

from datasets import Dataset  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from hf_extrapolate.training import (  # noqa: E402
    DirectionalGRPOTrainer,
    ReweightingConfig,
    ppl_sequence_weights,
    sequence_log_perplexity,
)
from tests.tiny import VOCAB, tiny_llama  # noqa: E402

ALPHA = 0.2
DIGITS = [str(i) for i in range(10)]


def word_tokenizer() -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer whose ids match `tests.tiny` (pad 0, bos 1, eos 2), VOCAB words."""
    words = ["<pad>", "<s>", "</s>", "<unk>", *DIGITS, *"abcdefghijklmnopqrstuvwxyz", "+", "="]
    words += [f"w{i}" for i in range(VOCAB - len(words))]
    backend = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", bos_token="<s>", unk_token="<unk>"
    )


def digit_reward(prompts, completions, **kwargs) -> list[float]:
    """Verifiable toy task "answer with digits": share of digit words, +1 if the first word is the correct sum."""
    rewards = []
    for prompt, completion in zip(prompts, completions):
        words = completion.split()
        a, _, b, _ = prompt.split()
        share = sum(w in DIGITS for w in words) / max(len(words), 1)
        rewards.append(share + float(bool(words) and words[0] == str((int(a) + int(b)) % 10)))
    return rewards


def make_trainer(
    method: str = "lowprob", alpha: float | None = ALPHA, max_steps: int = 2, **config
) -> DirectionalGRPOTrainer:
    dataset = Dataset.from_dict({"prompt": ["1 + 2 =", "3 + 4 =", "2 + 2 =", "5 + 1 =", "6 + 3 =", "4 + 4 ="]})
    args = GRPOConfig(
        output_dir=config.pop("output_dir"),
        loss_type="dapo",  # the paper's setting: DAPO, clip 0.2 / 0.28, no KL
        epsilon=0.2,
        epsilon_high=0.28,
        beta=0.0,
        num_generations=4,
        per_device_train_batch_size=8,
        max_completion_length=6,
        max_steps=max_steps,
        learning_rate=1e-2,
        temperature=1.0,
        use_cpu=True,
        report_to="none",
        logging_steps=1,
        save_strategy="no",
        seed=0,
        **config,
    )
    return DirectionalGRPOTrainer(
        model=tiny_llama(initializer_range=0.5),  # peaked enough that p_old varies across tokens
        reward_funcs=digit_reward,
        args=args,
        train_dataset=dataset,
        processing_class=word_tokenizer(),
        advantage_reweighting=method,
        reweight_alpha=alpha,
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> DirectionalGRPOTrainer:
    trainer = make_trainer(output_dir=str(tmp_path_factory.mktemp("grpo")))
    trainer.train()
    return trainer


def independent_logprobs(model, inputs) -> torch.Tensor:
    """Log-probs of the completion tokens from a plain forward pass (temperature 1), not through TRL's helper."""
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attention).logits.float()
    width = inputs["completion_ids"].shape[1]
    logp = torch.log_softmax(logits[:, -width - 1 : -1], dim=-1)
    return logp.gather(-1, inputs["completion_ids"].unsqueeze(-1)).squeeze(-1)


def plain_loss(trainer, inputs) -> torch.Tensor:
    """TRL's own, unmodified DAPO loss on `inputs`."""
    return GRPOTrainer._compute_loss(trainer, trainer.model, inputs)


def per_token_terms(loss_fn, trainer, inputs) -> torch.Tensor:
    """The (B, T) per-token terms of a DAPO loss, read off as d loss / d tool_mask in one call.

    TRL's loss multiplies its token mask by `inputs["tool_mask"]` (attention is unchanged) and DAPO sums
    `per_token_loss * mask / normalizer`, so the derivative with respect to a `tool_mask` of ones is exactly each
    token's term `per_token_loss_t / normalizer` (0 on padding).
    """
    tool_mask = torch.ones_like(inputs["completion_mask"], dtype=torch.float32, requires_grad=True)
    loss = loss_fn(trainer, {**inputs, "tool_mask": tool_mask})
    (terms,) = torch.autograd.grad(loss, tool_mask)
    return terms * inputs["completion_mask"]


def step_batch(trainer) -> dict:
    inputs = dict(trainer._buffered_inputs[0])  # one real step: prompts, sampled completions, advantages
    assert inputs["advantages"].abs().sum() > 0, "the tiny reward produced no learning signal; change the seed"
    return inputs


def test_training_runs_and_logs_the_weights(trained):
    logs = [entry for entry in trained.state.log_history if "reweight/weight_mean" in entry]
    assert len(logs) == 2  # one entry per step
    for entry in logs:
        assert 1.0 <= entry["reweight/weight_min"] <= entry["reweight/weight_mean"] <= entry["reweight/weight_max"]
        assert entry["reweight/weight_max"] <= 1.0 + ALPHA
        assert 0.0 <= entry["reweight/low_prob_frac"] <= 1.0
        assert torch.isfinite(torch.tensor(entry["loss"]))


@pytest.mark.parametrize("stale_old_policy", [False, True], ids=["on_policy", "old_logps_given"])
@pytest.mark.parametrize(
    ("method", "alpha"), [("lowprob", ALPHA), ("lowprob", 0.0), ("dominate", 0.2), ("none", None)]
)
def test_per_token_loss_terms_differ_exactly_as_the_formula_says(trained, method, alpha, stale_old_policy):
    trainer = trained
    trainer.reweighting = ReweightingConfig(method=method, alpha=alpha)
    inputs = step_batch(trainer)
    assert "old_per_token_logps" not in inputs  # TRL skipped them: the default on-policy configuration
    if stale_old_policy:  # as if TRL had computed old_per_token_logps (num_iterations > 1, vLLM, misaligned steps)
        inputs["old_per_token_logps"] = independent_logprobs(trainer.model, inputs) - 0.05
        p_old = inputs["old_per_token_logps"].exp()
    else:  # TRL skips them on-policy: p_old must come from the loss's own forward pass, detached
        p_old = independent_logprobs(trainer.model, inputs).exp()
    a = trainer.reweighting.alpha
    weights = {"lowprob": 1 + a * (1 - p_old), "dominate": a * p_old + (1 - a), "none": torch.ones_like(p_old)}[method]

    mask = inputs["completion_mask"]
    plain_terms = per_token_terms(plain_loss, trainer, inputs)
    reweighted_terms = per_token_terms(lambda tr, x: tr._compute_loss(tr.model, x), trainer, inputs)
    assert plain_terms.abs().sum() > 0
    assert_close(reweighted_terms, weights * plain_terms, rtol=1e-5, atol=1e-7)
    assert torch.all(reweighted_terms[mask == 0] == 0)
    if method == "lowprob" and alpha > 0:  # and the reweighting did change them
        assert not torch.allclose(reweighted_terms, plain_terms)

    # The full loss is the sum of the reweighted per-token terms (DAPO aggregates token terms linearly) ...
    trainer.model.zero_grad()
    total = trainer._compute_loss(trainer.model, inputs)
    assert_close(total.detach(), reweighted_terms.sum(), rtol=1e-5, atol=1e-6)
    # ... and, with gradients, equals TRL's loss with the advantages replaced by the constant A * w (no grad via p_old).
    total.backward()
    grads = [p.grad.clone() for p in trainer.model.parameters()]
    trainer.model.zero_grad()
    constant = {**inputs, "advantages": inputs["advantages"].unsqueeze(-1) * weights * mask}
    reference = plain_loss(trainer, constant)
    reference.backward()
    assert_close(total.detach(), reference.detach())
    for got, want in zip(grads, (p.grad for p in trainer.model.parameters())):
        assert_close(got, want, rtol=1e-5, atol=1e-7)
    trainer.model.zero_grad()


def test_buffered_batch_is_not_modified(trained):
    trained.reweighting = ReweightingConfig(method="lowprob", alpha=ALPHA)
    inputs = trained._buffered_inputs[0]
    before = inputs["advantages"].clone()
    trained._compute_loss(trained.model, inputs)
    assert inputs["advantages"].shape == before.shape and torch.equal(inputs["advantages"], before)


def test_ppl_reweights_each_response_within_its_group(trained):
    trainer = trained
    trainer.reweighting = ReweightingConfig(method="ppl", alpha=0.5)
    batch = step_batch(trainer)
    generated = {k: batch[k] for k in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "advantages")}
    generated["num_items_in_batch"] = batch["num_items_in_batch"]
    with mock.patch.object(GRPOTrainer, "_generate_and_score_completions", return_value=dict(generated)):
        output = trainer._generate_and_score_completions(inputs=None)  # TRL skipped old logps: one extra forward
    log_ppl = sequence_log_perplexity(independent_logprobs(trainer.model, generated), generated["completion_mask"])
    expected = generated["advantages"] * ppl_sequence_weights(log_ppl, 0.5, group_size=trainer.num_generations)
    assert output["advantages"].shape == generated["advantages"].shape
    assert_close(output["advantages"], expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(output["advantages"], generated["advantages"])
    # The loss then uses these (B,) advantages untouched.
    assert_close(trainer._compute_loss(trainer.model, output), plain_loss(trainer, output))


def test_ppl_training_runs(tmp_path):
    trainer = make_trainer(method="ppl", alpha=0.1, max_steps=1, output_dir=str(tmp_path))
    trainer.train()
    entry = next(e for e in trainer.state.log_history if "reweight/weight_mean" in e)
    assert entry["reweight/weight_min"] >= 0.0 and 0.0 <= entry["reweight/low_prob_frac"] <= 1.0


def test_invalid_method_fails_before_trl_starts():
    with pytest.raises(ValueError, match=r"`method` \(='entropy'\) must be one of"):
        DirectionalGRPOTrainer(model=None, advantage_reweighting="entropy")
