"""`DirectionalLogitsProcessor`: selective replacement / extrapolation inside `model.generate()`.

The RL model is the model that generates; the processor runs the base model beside it (`hf_extrapolate.reference`,
one forward per step on the new token only) and returns the scores of the step distribution of
`hf_extrapolate.directional`, so that generate's own sampler draws exactly from Algorithm 1 / Eq. 7 and its greedy
argmax picks exactly the greedy token.

What it does not do: it does not warp the outer distribution. Temperature, top-k and top-p belong to the config and
are applied to each component inside; the outer `generate` call must use neutral warpers
(`top_k=0, top_p=1.0, temperature=1.0`), or transformers would warp the mixture a second time.
`DirectionalModelForCausalLM` does this for you.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from transformers import LogitsProcessor

from . import cpu_kernel
from .config import ExtrapolationConfig
from .directional import directional_step_with_replacement
from .distributions import NEG_INF
from .fast_step import Workspace, fast_step
from .generate_context import describe, inspect_generate_call, is_reshaper, is_warper
from .reference import ReferenceModel, ReferencePolicy
from .statistics import ReplacementStats

logger = logging.getLogger(__name__)

# a padded embedding matrix differs from the tokenizer's size by at most this fraction (Qwen2.5: 151936 vs 152064)
PADDED_VOCAB_TOLERANCE = 0.01


def shared_vocab_size(rl_size: int, base_size: int, vocab_size: int | None = None) -> int:
    """The token range both models are compared on. Raises `ValueError` for a real vocabulary mismatch.

    With `vocab_size` (the tokenizer's `len(tokenizer)`) both models must cover it and it is used; without it, two
    sizes that differ by at most 1% are taken as the same tokenizer with padded embedding matrices.
    """
    if vocab_size is not None:
        if vocab_size > min(rl_size, base_size):
            raise ValueError(
                f"`vocab_size` (={vocab_size}) exceeds the RL model's ({rl_size}) or the base model's ({base_size}) "
                "output size: the two models do not share this tokenizer."
            )
        return vocab_size
    if rl_size == base_size:
        return rl_size
    small, large = sorted((rl_size, base_size))
    if large - small > PADDED_VOCAB_TOLERANCE * large:
        raise ValueError(
            f"The RL model scores {rl_size} tokens and the base model {base_size}: these are different vocabularies, "
            "and the method needs the same tokenizer for both. If they only differ by embedding padding, pass "
            "`vocab_size=len(tokenizer)`."
        )
    logger.info("RL and base vocabularies differ by padding (%d vs %d); comparing the first %d tokens.", rl_size, base_size, small)
    return small


def _default_eos(model: Any) -> Any:
    gen_cfg = getattr(model, "generation_config", None)
    eos = getattr(gen_cfg, "eos_token_id", None)
    if eos is None:
        eos = getattr(getattr(model, "config", None), "eos_token_id", None)
    return eos


class DirectionalLogitsProcessor(LogitsProcessor):
    r"""[`LogitsProcessor`] that turns the RL model's scores into the step distribution of selective token replacement
    (Algorithm 1) or test-time selective extrapolation (Eq. 7) of "On the Direction of RLVR Updates for LLM
    Reasoning" (ICLR 2026), running the base model beside the RL model with its own KV cache.

    With `do_sample=True` it returns `log q`, `q(y) = p(y) [c(y) does not fire] + M r(y)`, so generate's multinomial
    draw is exactly "draw from the proposal p; if the criterion fires, redraw from r". With `do_sample=False` it
    returns `log r` on rows where the criterion fires on `argmax p`, `log p` elsewhere. With beam search
    (`num_beams > 1`) it returns `log q`.

    Args:
        base_model (`PreTrainedModel` or `ReferencePolicy`):
            The base (pre-RLVR) causal LM sharing the RL model's tokenizer; any device and dtype (math is fp32).
            A `ReferencePolicy` (e.g. a configured `ReferenceModel`) is used as given.
        config (`ExtrapolationConfig` or `dict`, *optional*):
            What to compute; keyword `overrides` (`criterion=`, `gamma=`, ...) replace its fields.
        attention_mask (`torch.Tensor` of shape `(batch, prompt_length)`, *optional*):
            The attention mask passed to generate. Inside transformers' `generate` the processor reads generate's own
            mask, and a mask given here must agree with it (a stale mask from another batch is refused); it is
            needed only when the processor is called from a loop of one's own.
        do_sample (`bool`, *optional*): the `do_sample` of the generate call. Default: follow generate (read from
            its configuration; `True` outside transformers' loops); a value that contradicts generate is refused.
        num_beams (`int`, *optional*): the `num_beams` of the generate call, likewise followed by default.
        eos_token_id (`int` or `list[int]`, *optional*): ends a row for the statistics; defaults to generate's EOS
            (or the base model's generation config outside generate).
        vocab_size (`int`, *optional*): the tokenizer's size, when the two models' embedding matrices are padded
            differently by more than 1%.
        generator (`torch.Generator`, *optional*): RNG for the `random` criterion under greedy decoding.

    Example:

    ```python
    >>> from transformers import LogitsProcessorList
    >>> proc = DirectionalLogitsProcessor(base_model, ExtrapolationConfig(threshold=-0.3, gamma=0.1, top_p=0.7),
    ...                                   attention_mask=inputs["attention_mask"])
    >>> out = rl_model.generate(**inputs, do_sample=True, top_k=0, top_p=1.0, temperature=1.0,
    ...                         logits_processor=LogitsProcessorList([proc]), max_new_tokens=256)
    >>> proc.replace_ratio(out)  # expected fraction of replaced tokens per sequence
    ```
    """

    def __init__(
        self,
        base_model: Any,
        config: ExtrapolationConfig | dict | None = None,
        *,
        attention_mask: torch.Tensor | None = None,
        do_sample: bool | None = None,
        num_beams: int | None = None,
        eos_token_id: int | Sequence[int] | None = None,
        vocab_size: int | None = None,
        generator: torch.Generator | None = None,
        **overrides: Any,
    ):
        if config is None:
            config = ExtrapolationConfig()
        elif isinstance(config, dict):
            config = ExtrapolationConfig.from_dict(config)
        elif not isinstance(config, ExtrapolationConfig):
            raise TypeError(f"`config` must be an ExtrapolationConfig or a dict, got {type(config).__name__}.")
        self.config = config.replace(**overrides) if overrides else config
        if do_sample is not None and not isinstance(do_sample, bool):
            raise TypeError(f"`do_sample` (={do_sample!r}) must be a bool: the do_sample of your generate call.")
        if num_beams is not None and (isinstance(num_beams, bool) or not isinstance(num_beams, int) or num_beams < 1):
            raise ValueError(f"`num_beams` (={num_beams!r}) must be a positive integer, as passed to generate.")
        if vocab_size is not None and (not isinstance(vocab_size, int) or vocab_size < 1):
            raise ValueError(f"`vocab_size` (={vocab_size!r}) must be a positive int, e.g. len(tokenizer).")
        if isinstance(base_model, ReferencePolicy):
            if attention_mask is not None:
                base_model.reset(attention_mask)
            self.reference = base_model
            model = base_model.model
        else:
            self.reference = ReferenceModel(base_model, attention_mask, num_beams=num_beams or 1)
            model = base_model
        self._requested = {"do_sample": do_sample, "num_beams": num_beams}
        self._set_mode(True if do_sample is None else do_sample, self.reference.num_beams)
        self._eos_given = eos_token_id is not None
        self.eos_token_id = eos_token_id if eos_token_id is not None else _default_eos(model)
        self.vocab_size = vocab_size
        self.generator = generator
        self.stats = ReplacementStats()
        self.finite = FiniteCheck()
        self._workspace = Workspace()  # the step's intermediates, reused from step to step
        self._pending: tuple | None = None  # (position, log q, redraw, M, padded) of the last sampled step
        self._seen: tuple[int, int] | None = None  # (rows, length) of the last call

    def _set_mode(self, do_sample: bool, num_beams: int) -> None:
        self.do_sample = do_sample
        self.num_beams = num_beams
        self.greedy = not do_sample and num_beams == 1

    def reset(self, attention_mask: torch.Tensor | None = None) -> None:
        """Forget the base cache and the statistics (optionally for inputs with a new attention mask)."""
        self.reference.reset(attention_mask)
        self.stats.reset(0)
        self.finite.reset()
        self._pending = None
        self._seen = None

    @torch.no_grad()
    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        rows, position = input_ids.shape
        seen = self._seen
        if seen is None or seen[0] != rows or seen[1] + 1 != position:  # not the one-new-token step: prefill etc.
            self._follow_generate(input_ids)
        self._seen = (rows, position)
        base_logits = self.reference(input_ids)
        if self.reference.started_generation:
            self.stats.reset(position)
            self.finite.reset(position)
            self._pending = None
        elif self.reference.last_reorder is not None:
            self.stats.reorder(self.reference.last_reorder)
            self._pending = None
        self._resolve_pending(input_ids)

        rl_size, base_size = scores.shape[-1], base_logits.shape[-1]
        shared = shared_vocab_size(rl_size, base_size, self.vocab_size)
        rl_scores = scores[:, :shared] if shared < rl_size else scores
        base_scores = base_logits[:, :shared] if shared < base_size else base_logits
        step = fast_step(
            rl_scores, base_scores, self.config, greedy=self.greedy, generator=self.generator, workspace=self._workspace
        )
        if step is None:  # configurations the fast path does not cover: the definition itself
            out, mass, log_r = directional_step_with_replacement(
                rl_scores, base_scores, self.config, greedy=self.greedy, generator=self.generator
            )
            self.finite.record(position, rl_scores, base_scores, out)
            redraw = (log_r, True)
        else:
            out, mass = step.scores, step.mass
            self.finite.record_summary(position, step.finite, rl_scores, base_scores, out)
            redraw = (step.redraw, step.redraw_is_log)
        if self.greedy:  # the token is the step's argmax: its posterior is the 0 / 1 mass
            self.stats.record(position, mass, posterior=mass)
        else:
            self.stats.record(position, mass)
            self._pending = (position, out, redraw, mass, shared < rl_size)
        if shared < rl_size:
            out = torch.cat([out, out.new_full((out.shape[0], rl_size - shared), NEG_INF)], dim=-1)
        return out

    # ------------------------------------------------------------------ the generate call around the processor
    def _follow_generate(self, input_ids: torch.Tensor) -> None:
        """Read the enclosing generate call (once per prefill or rollback, never on the one-token step): follow its
        decoding mode, refuse settings that would make the result wrong, and hand its attention mask to the base."""
        ctx = inspect_generate_call(self)
        gen = ctx.generation_config
        if gen is not None:
            do_sample, num_beams = bool(gen.do_sample), int(gen.num_beams or 1)
            for name, value in (("do_sample", do_sample), ("num_beams", num_beams)):
                asked = self._requested[name]
                if asked is not None and asked != value:
                    raise ValueError(
                        f"DirectionalLogitsProcessor(`{name}`={asked!r}) runs inside a generate call with "
                        f"{name}={value!r}: the processor would compute the step of another decoding mode. Pass the "
                        f"same `{name}` to both, or leave it out of the processor (it follows generate)."
                    )
            self._set_mode(do_sample, num_beams)
            if isinstance(self.reference, ReferenceModel):
                self.reference.num_beams = num_beams
                if self.reference.prompt_mask is None and gen.pad_token_id is not None:
                    self.reference.pad_token_id = gen.pad_token_id
                    self.reference.eos_token_id = gen.eos_token_id
            if not self._eos_given:
                self.eos_token_id = gen.eos_token_id
        for p in ctx.after(self):
            if is_warper(p):
                raise ValueError(
                    f"generate applies {describe(p)} after DirectionalLogitsProcessor: it would warp the mixture a "
                    "second time. Temperature, top-k and top-p belong to the ExtrapolationConfig (applied inside each "
                    "component); call generate with neutral warpers, `top_k=0, top_p=1.0, temperature=1.0` (transformers' "
                    "default top_k is 50), or use DirectionalModelForCausalLM, which does this for you."
                )
        for p in ctx.before(self):
            if is_reshaper(p):
                raise ValueError(
                    f"{describe(p)} runs before DirectionalLogitsProcessor: it reshapes the RL model's scores but not "
                    "the base model's, which shifts the direction log pi_RL - log pi_base the method reads. Remove it "
                    "(e.g. `repetition_penalty=1.0`), or put its effect in the ExtrapolationConfig (temperature, top_k, "
                    "top_p). Processors that only mask tokens (-inf) are supported."
                )
        if isinstance(self.reference, ReferenceModel):
            mask = ctx.attention_mask
            if mask is not None and mask.shape[0] == input_ids.shape[0] and mask.shape[1] >= input_ids.shape[1]:
                self.reference.set_call_mask(mask[:, : input_ids.shape[1]])

    # ------------------------------------------------------------------ statistics
    def _resolve_pending(self, tokens: torch.Tensor) -> None:
        """Posterior that the token drawn at the last step was a redraw, `M r(y) / q(y)` for the chosen y: its
        factors are read here (two gathers), the ratio is formed when the statistics are read."""
        if self._pending is None:
            return
        position, log_q, (redraw, is_log), mass, padded = self._pending
        self._pending = None
        if tokens.shape[1] > position:
            kernel = cpu_kernel.active()
            if (kernel is not None and tokens.device.type == "cpu" and log_q.device.type == "cpu"
                    and log_q.dtype == torch.float32 and redraw.dtype == torch.float32
                    and log_q.is_contiguous() and redraw.is_contiguous()):  # one call: (log q(y), r(y)) as (R, 2)
                self.stats.record_posterior_factors(position, mass, kernel.chosen_factors(log_q, redraw, tokens,
                                                                                          position), None, is_log)
                return
            chosen = tokens[:, position : position + 1]
            if chosen.device != log_q.device:
                chosen = chosen.to(log_q.device)
            if padded:  # a token of the padded vocabulary tail (probability 0) reads the last shared column
                chosen = chosen.clamp(max=log_q.shape[-1] - 1)
            self.stats.record_posterior_factors(position, mass, log_q.gather(-1, chosen), redraw.gather(-1, chosen),
                                                is_log)

    def _require_generation(self, what: str) -> None:
        if self.stats.mass is None or self.reference.ids is None:
            raise RuntimeError(
                f"`{what}()` has nothing to report yet: call `generate(..., logits_processor=[processor])` first "
                "(the statistics belong to the processor's last generate call)."
            )

    def replace_ratio(self, sequences: torch.Tensor | Any | None = None) -> torch.Tensor:
        """Expected fraction of replaced tokens per sequence, shape (rows,): the mean of the replaced mass M over each
        row's generated positions up to and including its first EOS (the paper's "Replaced Ratio").

        Pass generate's output (`sequences`, or the output object) for exact bounds under assisted decoding; for
        beam search the rows are the live beams of the last step (call without `sequences`).
        """
        self._require_generation("replace_ratio")
        self.reference.check()
        self.finite.check()
        sequences = getattr(sequences, "sequences", sequences)
        return self.stats.replace_ratio(self.reference.ids, self.eos_token_id, sequences)

    def replaced_token_probability(self, sequences: torch.Tensor | Any | None = None) -> torch.Tensor:
        """Per generated position (rows, positions): the probability that the token there was a redraw, `M r(y)/q(y)`
        (0 or 1 under greedy decoding); NaN for padding after EOS. Pass generate's output to include its last token.
        """
        self._require_generation("replaced_token_probability")
        sequences = getattr(sequences, "sequences", sequences)
        if sequences is not None:
            self._resolve_pending(sequences)
        self.reference.check()
        valid = self.stats.valid(self.reference.ids, self.eos_token_id, sequences)
        post = self.stats.posterior[:, : valid.shape[1]]
        return post.masked_fill(~valid, float("nan"))


class FiniteCheck:
    """Device-side record of non-finite scores from either model (NaN, +inf, or a row with no allowed token).

    One max-reduction per tensor per step; read back at once on CPU and every `check_every` steps (and by
    `check()`) on accelerators, so it adds no host-device synchronisation to the step. Raises `FloatingPointError`
    naming the model and the step."""

    def __init__(self, check_every: int = 32):
        self.check_every = check_every
        self.reset()

    def reset(self, prompt_length: int | None = None) -> None:
        self.prompt_length = prompt_length
        self._flags: list[tuple[int, torch.Tensor]] = []

    def record(self, position: int, rl: torch.Tensor, base: torch.Tensor, out: torch.Tensor) -> None:
        # amax is NaN if a row holds NaN, +inf if it holds +inf, -inf if every token is -inf
        if rl.device.type == "cpu":  # reading back is free: one finiteness test of the sum, details only if it fails
            if not bool(torch.isfinite(rl.amax(-1) + base.amax(-1) + out.amax(-1)).all()):
                self._flags.append((position, torch.stack([rl.amax(-1), base.amax(-1), out.amax(-1)])))
                self.check()
            return
        self._flags.append((position, torch.stack([rl.amax(-1), base.amax(-1), out.amax(-1)])))  # (3, rows)
        if len(self._flags) >= self.check_every:
            self.check()

    def record_summary(
        self, position: int, summary: torch.Tensor | bool, rl: torch.Tensor, base: torch.Tensor, out: torch.Tensor
    ) -> None:
        """`record`, given `fast_step.FastStep.finite` (True: known finite; or a (rows,) tensor finite iff the step
        is): on CPU one finiteness test of it, the full diagnosis only if it fails; on accelerators `record`."""
        if summary is True:
            return
        if rl.device.type == "cpu":
            if not bool(torch.isfinite(summary).all()):
                self.record(position, rl, base, out)
            return
        self.record(position, rl, base, out)

    def check(self) -> None:
        flags, self._flags = self._flags, []
        if not flags:
            return
        bad = torch.stack([~torch.isfinite(p) for _, p in flags])  # (steps, 3, rows)
        if not bool(bad.any()):
            return
        step = int(bad.any(-1).any(-1).int().argmax())
        position, peaks = flags[step]
        rows = bad[step].any(0).nonzero().flatten().tolist()
        which = bad[step].any(-1).tolist()
        number = position - self.prompt_length if self.prompt_length is not None else position
        where = f"at generation step {number} (position {position}), rows {rows}"
        if which[0]:
            raise FloatingPointError(
                f"The RL model's scores are not finite {where} (NaN, +inf, or every token masked by an earlier "
                "logits processor): check the RL model's dtype (fp16 overflows: use bfloat16 or float32), its weights "
                "and the processors before DirectionalLogitsProcessor."
            )
        if which[1]:
            raise FloatingPointError(
                f"The base model's logits are not finite {where} (NaN or +inf): check the base model's dtype (fp16 "
                "overflows: load it in bfloat16 or float32) and its weights."
            )
        raise FloatingPointError(
            f"The step distribution has no finite score {where}: the base model assigns probability 0 to every token "
            "the RL model allows. Check that the two models share a tokenizer, or relax the upstream masks."
        )
