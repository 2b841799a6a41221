"""`DirectionalGRPOTrainer`: TRL's `GRPOTrainer` with probability-aware advantage reweighting inside its loss.

The subclass changes one thing, the advantage tensor that TRL's unmodified `_compute_loss` reads; the loss itself
(clipping, DAPO token-level aggregation, KL, entropy bonus, metrics) is TRL's. TRL's loss accepts per-token
advantages of shape `(B, T)` for exactly this purpose.

Where the hook sits, and why:

- "lowprob" (Eq. 8) and "dominate" need `p_old` per token. When TRL has computed `old_per_token_logps` (the
  generation and optimisation steps are misaligned, `num_iterations > 1`, or vLLM importance sampling), the weights
  come from them before the loss runs. When it has not (the default on-policy case, where TRL itself uses
  `old = per_token_logps.detach()`), the policy has not moved since generation, so `p_old = exp(per_token_logps)`
  of the loss's own forward pass, detached: `_get_per_token_logps_and_entropies` is wrapped so that, during
  `_compute_loss` only, the advantages are replaced right after that forward pass and before TRL reads them. No
  extra forward pass, and the weights carry no gradient. `_compute_loss` raises if the wrap did not fire (a TRL
  version that no longer calls it), and `tests/test_training_trl.py` pins that the resulting loss equals TRL's loss
  with the advantages replaced by `A * w`.
- "ppl" needs one weight per response, normalised within the group of responses to one prompt, and a group can be
  split across micro-batches and processes. A per-token hook in the loss cannot see the whole group, so this option
  reweights the `(B,)` advantages once per generation batch in `_generate_and_score_completions` (gathering the
  per-response log-perplexities across processes, as TRL does for rewards). It needs the old log-probs of the whole
  generation batch; when TRL skipped them, this costs one extra no-grad forward pass per generation batch.

The batch TRL buffers is never modified: the loss works on a shallow copy, since the same batch is reused across
`num_iterations`.

Logged per step through TRL's metrics: `reweight/weight_mean`, `reweight/weight_min`, `reweight/weight_max` (over
response tokens) and `reweight/low_prob_frac`, the share of response tokens with `p_old < low_prob_threshold`.

This module imports `trl`; install it with `pip install hf_extrapolate[train]`. `hf_extrapolate.training` only
imports this module when `DirectionalGRPOTrainer` is first accessed.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch

try:
    from trl import GRPOTrainer
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "`DirectionalGRPOTrainer` needs TRL, an optional dependency of hf_extrapolate: "
        "`pip install hf_extrapolate[train]` (or `pip install 'trl>=1.0'`)."
    ) from exc

try:
    from trl.models.utils import disable_gradient_checkpointing
except ImportError:  # pragma: no cover - older/newer TRL layouts
    disable_gradient_checkpointing = None

from .config import ReweightingConfig
from .reweighting import ppl_sequence_weights, reweight_advantages, sequence_log_perplexity, token_weights

logger = logging.getLogger(__name__)

# The multimodal inputs TRL's `_compute_loss` forwards to `_get_per_token_logps_and_entropies`.
_FORWARD_KEYS = (
    "pixel_values",
    "image_grid_thw",
    "num_images",
    "pixel_attention_mask",
    "spatial_shapes",
    "num_tiles",
    "image_sizes",
    "token_type_ids",
    "mm_token_type_ids",
    "image_position_ids",
)


class DirectionalGRPOTrainer(GRPOTrainer):
    """TRL's `GRPOTrainer` whose loss uses reweighted advantages `Â_t = A · w_t` (the paper's Eq. 8 by default).

    Takes every argument of `trl.GRPOTrainer`, plus:

    Args:
        advantage_reweighting (`str`, defaults to `"lowprob"`):
            `"lowprob"` (Eq. 8: `w_t = 1 + alpha (1 - p_old,t)`), `"dominate"` (Yang et al. 2025:
            `w_t = alpha p_old,t + 1 - alpha`), `"ppl"` (Deng et al. 2025: one weight per response from its
            group-normalised log-perplexity) or `"none"` (plain TRL loss, metrics still logged).
        reweight_alpha (`float`, *optional*):
            Strength; `None` uses the method's default (`DEFAULT_ALPHA`: 0.2 for "lowprob", the paper's value for
            Qwen2.5-Math-7B; use 0.1 for Qwen3-8B-Base).
        low_prob_threshold (`float`, defaults to 0.5):
            Tokens with `p_old` below it count towards the logged `reweight/low_prob_frac`.

    Example (the paper's DAPO setting):

    ```python
    >>> from trl import GRPOConfig
    >>> from hf_extrapolate.training import DirectionalGRPOTrainer
    >>> args = GRPOConfig(output_dir="out", loss_type="dapo", epsilon=0.2, epsilon_high=0.28, beta=0.0)
    >>> trainer = DirectionalGRPOTrainer(
    ...     model="Qwen/Qwen2.5-Math-7B", reward_funcs=accuracy_reward, args=args, train_dataset=dataset,
    ...     advantage_reweighting="lowprob", reweight_alpha=0.2,
    ... )
    >>> trainer.train()
    ```
    """

    def __init__(
        self,
        *args: Any,
        advantage_reweighting: str = "lowprob",
        reweight_alpha: float | None = None,
        low_prob_threshold: float = 0.5,
        **kwargs: Any,
    ) -> None:
        # Validate before TRL's (heavy) initialisation, so a typo fails fast.
        self.reweighting = ReweightingConfig(
            method=advantage_reweighting, alpha=reweight_alpha, low_prob_threshold=low_prob_threshold
        )
        self._pending_reweight: dict[str, Any] | None = None
        super().__init__(*args, **kwargs)
        logger.info(
            "DirectionalGRPOTrainer: advantage_reweighting=%r, alpha=%s, loss_type=%r",
            self.reweighting.method,
            self.reweighting.alpha,
            self.loss_type,
        )

    # ------------------------------------------------------------------ token-level methods: inside the loss
    def _compute_loss(self, model, inputs):
        if self.reweighting.method == "ppl":  # already applied to the (B,) advantages at generation time
            return super()._compute_loss(model, inputs)
        inputs = dict(inputs)  # shallow copy: TRL reuses the buffered batch across `num_iterations`
        old_logps = inputs.get("old_per_token_logps")
        if old_logps is not None:
            self._reweight_inputs(inputs, old_logps)
        else:
            self._pending_reweight = inputs  # filled in by `_get_per_token_logps_and_entropies` below
        try:
            loss = super()._compute_loss(model, inputs)
        finally:
            pending, self._pending_reweight = self._pending_reweight, None
        if pending is not None:
            raise RuntimeError(
                "DirectionalGRPOTrainer could not reweight the advantages: TRL's `GRPOTrainer._compute_loss` did not "
                "call `_get_per_token_logps_and_entropies`, which this hook relies on when `old_per_token_logps` is "
                "absent. Install a TRL version this package supports (`pip install hf_extrapolate[train]`)."
            )
        return loss

    def _get_per_token_logps_and_entropies(self, model, *args, **kwargs):
        outputs = super()._get_per_token_logps_and_entropies(model, *args, **kwargs)
        pending, self._pending_reweight = self._pending_reweight, None
        if pending is not None:
            # On-policy step: TRL uses old = per_token_logps.detach(), so p_old = exp(per_token_logps), detached.
            self._reweight_inputs(pending, outputs[0].detach())
        return outputs

    def _reweight_inputs(self, inputs: dict[str, Any], old_logps: torch.Tensor) -> None:
        """Replace `inputs["advantages"]` by the (B, T) reweighted advantages and log the weights."""
        cfg = self.reweighting
        mask = inputs["completion_mask"]
        if "tool_mask" in inputs:  # the same mask TRL's loss uses
            mask = mask * inputs["tool_mask"]
        if cfg.method != "none":
            inputs["advantages"] = reweight_advantages(inputs["advantages"], old_logps, mask, cfg.method, cfg.alpha)
        self._log_reweight_metrics(token_weights(old_logps, mask, cfg.method, cfg.alpha), old_logps, mask)

    # ------------------------------------------------------------------ "ppl": once per generation batch
    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        if self.reweighting.method != "ppl":
            return output
        mode = "train" if self.model.training else "eval"
        mask = output["completion_mask"]
        if output.get("tool_mask") is not None:
            mask = mask * output["tool_mask"]
        old_logps = output.get("old_per_token_logps")
        if old_logps is None:
            old_logps = self._old_logps_of_batch(output, mode)
        # Groups are consecutive in the batch gathered across processes, as for TRL's own reward normalisation.
        log_ppl = self.accelerator.gather(sequence_log_perplexity(old_logps, mask))
        valid = self.accelerator.gather(mask.bool().any(-1).float()).bool()
        group_size = self.num_generations if mode == "train" else self.num_generations_eval
        local = slice(self.accelerator.process_index * len(mask), (self.accelerator.process_index + 1) * len(mask))
        seq_weights = ppl_sequence_weights(log_ppl, self.reweighting.alpha, group_size, valid)[local]
        advantages = output["advantages"]
        seq_weights = seq_weights.to(device=advantages.device, dtype=advantages.dtype)
        output["advantages"] = advantages * (seq_weights if advantages.dim() == 1 else seq_weights.unsqueeze(-1))
        self._log_reweight_metrics(seq_weights.unsqueeze(-1) * mask, old_logps, mask)
        return output

    def _old_logps_of_batch(self, output: dict[str, Any], mode: str) -> torch.Tensor:
        """One no-grad forward pass for the old log-probs that TRL skipped (the policy has not moved yet)."""
        input_ids = torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1)
        attention_mask = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)
        batch_size = self.args.per_device_train_batch_size if mode == "train" else self.args.per_device_eval_batch_size
        extra = {key: output[key] for key in _FORWARD_KEYS if output.get(key) is not None}
        no_checkpointing = (
            disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs)
            if disable_gradient_checkpointing is not None
            else contextlib.nullcontext()
        )
        with torch.no_grad(), no_checkpointing:
            logps, _, _ = self._get_per_token_logps_and_entropies(
                self.model, input_ids, attention_mask, output["completion_ids"].size(1), batch_size=batch_size, **extra
            )
        return logps

    # ------------------------------------------------------------------ metrics
    @torch.no_grad()
    def _log_reweight_metrics(self, weights: torch.Tensor, old_logps: torch.Tensor, mask: torch.Tensor) -> None:
        """Append mean/min/max of the weights and the low-probability share over response tokens to TRL's metrics."""
        mode = "train" if self.model.training else "eval"
        keep = mask.bool()
        weights = weights.float()
        low = (old_logps.detach().float().exp() < self.reweighting.low_prob_threshold) & keep
        sums = torch.stack([(weights * keep).sum(), keep.sum().float(), low.sum().float()])
        total_weight, count, total_low = self.accelerator.reduce(sums, reduction="sum").tolist()
        inf = torch.tensor(float("inf"), device=weights.device)
        w_max = self.accelerator.gather(torch.where(keep, weights, -inf).max().reshape(1)).max().item()
        w_min = self.accelerator.gather(torch.where(keep, weights, inf).min().reshape(1)).min().item()
        if count == 0:  # no response token anywhere: nothing to report
            return
        metrics = self._metrics[mode]
        metrics["reweight/weight_mean"].append(total_weight / count)
        metrics["reweight/weight_min"].append(w_min)
        metrics["reweight/weight_max"].append(w_max)
        metrics["reweight/low_prob_frac"].append(total_low / count)
