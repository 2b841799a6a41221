"""The base (reference) model run beside `generate()`, with its own KV cache kept in step with `input_ids`.

`ReferenceModel(input_ids)` returns the base model's next-token logits for the last position of every row. It keeps
a KV cache of the tokens it has consumed and synchronises it from what it is shown, never by counting calls (like
transformers' `candidate_generator.py`):

- one new token per row (the common case): one forward on that token;
- a shorter or diverging prefix (assisted decoding rejected draft tokens, a second `generate` call): the cache is
  cropped to the longest common prefix (`cache.crop(-n)`) and only the rest is fed; a cache that cannot be cropped
  (sliding-window layers past their window, linear attention) is rebuilt from the full prefix;
- beam search (`num_beams > 1`): rows are matched to the previous step's rows by prefix within each batch element and
  the cache is reordered (`cache.reorder_cache`), as generate does for the main model;
- a new row count or a fresh prompt: the cache is rebuilt (the first forward of a generation is the prefill).

The attention mask of the prompt (left padding) is given once, its rows repeated for `num_return_sequences` /
`num_beams` exactly as generate does (`repeat_interleave`); generated columns are attended. Position ids are
`cumsum(mask) - 1` (0 under padding), as generate computes them, so absolute-position models (GPT-2) are right; on
the fast path the count is kept running (one `+ 1` per step, no cumsum over the prefix).

The fast path does not synchronise host and device: whether the prefix really matched is accumulated in a device
flag, checked immediately on CPU and every `check_every` steps (and on every slow-path call) on accelerators.
A mismatch raises `RuntimeError`; results are never silently wrong.

This module does not compute any distribution: see `hf_extrapolate.processor`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Any

import torch

logger = logging.getLogger(__name__)

# positions whose base logits are kept once rollbacks were seen (assisted decoding re-verifies up to this many drafts)
MEMO_WINDOW = 32


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the input embeddings (where `input_ids` must go, also under `device_map`)."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is not None and getattr(emb, "weight", None) is not None:
        return emb.weight.device
    return next(model.parameters()).device


def check_causal_lm(model: Any, name: str = "base_model") -> None:
    """Raise a `TypeError` unless `model` is a decoder-only causal LM (a transformers or PEFT model)."""
    config = getattr(model, "config", None)
    ok = isinstance(model, torch.nn.Module) and config is not None and hasattr(model, "get_output_embeddings")
    if ok and getattr(config, "is_encoder_decoder", False):
        ok = False
    if ok:
        try:
            ok = model.get_output_embeddings() is not None
        except (AttributeError, NotImplementedError):
            ok = False
    if not ok:
        raise TypeError(
            f"`{name}` (={type(model).__name__}) must be a decoder-only causal language model with an LM head, e.g. "
            f"`AutoModelForCausalLM.from_pretrained(...)` (or a PEFT model wrapping one); encoder-decoder models and "
            "bare backbones (`AutoModel`) are not supported."
        )


class ReferencePolicy:
    """What `DirectionalLogitsProcessor` needs from the source of base-model logits.

    `__call__(input_ids (R, T)) -> (R, V)` fp32 logits of the base distribution after the T tokens of every row, on
    `input_ids.device`. After a call, `started_generation` says whether it began a new generation, `last_reorder` is
    the beam index applied to the rows (or None) and `ids` the tokens seen. `ReferenceModel` runs a separate model;
    `hf_extrapolate.peft_pair.FusedLoRAReference` reads the base half of a fused LoRA forward.
    """

    model: torch.nn.Module
    num_beams: int = 1
    started_generation: bool = False
    last_reorder: torch.Tensor | None = None
    ids: torch.Tensor | None = None

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def reset(self, attention_mask: torch.Tensor | None = None) -> None:
        raise NotImplementedError

    def check(self) -> None:
        """Raise if the state fell out of step with generate (default: nothing to check)."""


class ReferenceModel(ReferencePolicy):
    """Run `model` on exactly the tokens generate has produced, one forward per step, with its own KV cache.

    Args:
        model: the base model (`PreTrainedModel`, or a PEFT model), on any device and dtype.
        attention_mask (`torch.Tensor` of shape `(batch, prompt_length)`, *optional*): the prompt's attention mask
            as passed to `generate`. Required for left-padded batches. Rows are repeated to fit
            `num_return_sequences` / `num_beams` expansion.
        num_beams (`int`, defaults to 1): set to generate's `num_beams` for beam search, so rows are re-matched.
        forward_context (*optional*): a callable returning a context manager entered around every forward (used to
            run a PEFT model with its adapter disabled).
        check_every (`int`, defaults to 32): on accelerators, how many fast steps may pass before the device-side
            prefix check is read back (0: never on the fast path, only on slow-path calls).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        attention_mask: torch.Tensor | None = None,
        *,
        num_beams: int = 1,
        forward_context: Callable[[], contextlib.AbstractContextManager] | None = None,
        check_every: int = 32,
    ):
        check_causal_lm(model)
        if attention_mask is not None:
            if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
                raise ValueError(
                    "`attention_mask` must be the 2-D (batch, prompt_length) mask passed to generate, e.g. "
                    f"`inputs['attention_mask']`; got {type(attention_mask).__name__} of shape "
                    f"{tuple(getattr(attention_mask, 'shape', ()))}."
                )
        if not isinstance(num_beams, int) or num_beams < 1:
            raise ValueError(f"`num_beams` (={num_beams!r}) must be a positive integer, as passed to generate.")
        self.model = model
        self.num_beams = num_beams
        self.forward_context = forward_context or contextlib.nullcontext
        self.check_every = check_every
        self.device = model_device(model)
        self.prompt_mask = attention_mask.to(self.device) if attention_mask is not None else None
        self.reset()

    # ------------------------------------------------------------------ state
    def reset(self, attention_mask: torch.Tensor | None = None) -> None:
        """Forget the cache (and optionally set a new prompt attention mask)."""
        if attention_mask is not None:
            self.prompt_mask = attention_mask.to(self.device)
        self.cache = None
        self.ids: torch.Tensor | None = None  # (R, L) tokens the cache has consumed
        self.mask: torch.Tensor | None = None  # (R, L) their attention mask
        self.prompt_length: int | None = None
        self.last_reorder: torch.Tensor | None = None  # beam_idx applied at the last call, for the caller's state
        self.started_generation = False  # whether the last call began a new generation
        self._memo: dict[int, torch.Tensor] = {}  # consumed length -> (R, V) logits, kept after a rollback
        self._keep_memo = False
        self._ok: torch.Tensor | None = None
        self._unchecked = 0
        self._next_position: torch.Tensor | None = None  # (R, 1) position id of the next token, kept running
        self.stats = {"prefill": 0, "fast": 0, "rollback": 0, "rebuild": 0, "reorder": 0}

    @property
    def num_consumed(self) -> int:
        return 0 if self.ids is None else self.ids.shape[1]

    # ------------------------------------------------------------------ call
    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Base logits (R, V) in fp32 on `input_ids.device` for the last position of every row of `input_ids` (R, T)."""
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"`input_ids` must be a non-empty (batch, length) tensor, got {tuple(input_ids.shape)}.")
        out_device = input_ids.device
        ids = input_ids.to(self.device)
        rows, length = ids.shape
        self.last_reorder = None
        self.started_generation = False
        consumed = self.num_consumed

        if self.ids is None or rows != self.ids.shape[0]:
            logits = self._prefill(ids)
            new_generation = True
        elif length == consumed + 1 and length > self.prompt_length:
            if self.num_beams > 1:
                self._reorder_beams(ids)
            else:
                self._accumulate_check(ids[:, :consumed] == self.ids)
            logits = self._forward(ids, consumed)
            self.stats["fast"] += 1
            new_generation = False
        else:
            logits, new_generation = self._sync_slow(ids)
        if new_generation:
            self.prompt_length = length
            self.started_generation = True
        return logits.to(out_device, torch.float32)

    # ------------------------------------------------------------------ internals
    def _row_mask(self, rows: int, length: int) -> torch.Tensor:
        """The attention mask (rows, length): prompt mask repeated to `rows`, ones for generated columns."""
        if self.prompt_mask is None:
            return torch.ones(rows, length, dtype=torch.long, device=self.device)
        batch, width = self.prompt_mask.shape
        if rows % batch != 0:
            raise ValueError(
                f"`attention_mask` has batch size {batch}, but generate runs {rows} rows, which is not a multiple of it. "
                "Pass the attention mask of the same inputs you pass to generate (its rows are repeated for "
                "num_return_sequences / num_beams), or call `reset(attention_mask=...)` before a new generate call."
            )
        mask = self.prompt_mask.repeat_interleave(rows // batch, dim=0) if rows != batch else self.prompt_mask
        if length <= width:
            if length < width:
                raise ValueError(
                    f"The first call sees {length} tokens but `attention_mask` covers {width}: the mask does not belong "
                    "to these inputs. Pass the mask of the inputs you generate from, or `reset(attention_mask=...)`."
                )
            return mask.long()
        return torch.cat([mask.long(), mask.new_ones(rows, length - width, dtype=torch.long)], dim=1)

    def _prefill(self, ids: torch.Tensor) -> torch.Tensor:
        self.cache = None
        self.ids = ids[:, :0]
        self.mask = self._row_mask(ids.shape[0], ids.shape[1])[:, :0]
        self._memo.clear()
        self.stats["prefill"] += 1
        return self._forward(ids, 0, full_mask=self._row_mask(ids.shape[0], ids.shape[1]))

    def _forward(self, ids: torch.Tensor, start: int, full_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Feed `ids[:, start:]` on top of a cache holding `ids[:, :start]`; return the last position's logits."""
        rows, length = ids.shape
        new = length - start
        if full_mask is None:
            full_mask = torch.cat([self.mask, self.mask.new_ones(rows, new)], dim=1)
            running = new == 1 and self._next_position is not None
        else:
            running = False
        if running:  # one new, attended token: its position is the running count (no cumsum over the prefix)
            positions = self._next_position
            next_position = positions + 1
        else:
            positions = (full_mask.cumsum(-1) - 1).masked_fill(full_mask == 0, 0)[:, start:]
            next_position = full_mask.sum(-1, keepdim=True)
        keep = min(length - start, MEMO_WINDOW) if self._keep_memo else 1
        with self.forward_context():
            out = self.model(
                input_ids=ids[:, start:],
                attention_mask=full_mask,
                position_ids=positions,
                cache=self.cache,
                use_cache=True,
                logits_to_keep=keep,
            )
        self.cache = out.cache if hasattr(out, "cache") else out["cache"]
        self.ids = ids
        self.mask = full_mask
        self._next_position = next_position
        logits = out.logits
        if self._keep_memo:
            for j in range(logits.shape[1]):
                self._memo[length - logits.shape[1] + j + 1] = logits[:, j]
            for k in [k for k in self._memo if k <= length - MEMO_WINDOW]:
                del self._memo[k]
        return logits[:, -1]

    def _common_prefix(self, ids: torch.Tensor) -> int:
        """Length of the longest prefix shared by every row of `ids` and the consumed tokens (synchronises)."""
        n = min(ids.shape[1], self.num_consumed)
        if n == 0:
            return 0
        diff = (ids[:, :n] != self.ids[:, :n]).any(0)
        return int(diff.int().argmax()) if bool(diff.any()) else n

    def _sync_slow(self, ids: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """Rollback / re-verification / new prompt. Returns the logits and whether a new generation begins."""
        self.check()
        length = ids.shape[1]
        common = self._common_prefix(ids)
        # a continuation of the current generation keeps its whole prompt and extends past it
        new_generation = common < self.prompt_length or length <= self.prompt_length
        if common == length and length in self._memo:
            # every token already consumed and its logits still at hand (assisted decoding re-verifies drafts)
            return self._memo[length], new_generation
        keep = min(common, length - 1)
        if keep == 0:
            return self._prefill(ids), True
        self._keep_memo = True  # rollbacks happen (assisted decoding): keep per-position logits from now on
        self.stats["rollback"] += 1
        if not self._truncate(keep):
            self.stats["rebuild"] += 1
            return self._prefill(ids), new_generation
        return self._forward(ids, keep), new_generation

    def _truncate(self, keep: int) -> bool:
        """Crop the cache to its first `keep` tokens. Returns False when the cache cannot be cropped."""
        drop = self.num_consumed - keep
        if drop > 0:
            try:
                if not getattr(self.cache, "is_croppable", True):
                    return False
                self.cache.crop(-drop)
            except (RuntimeError, ValueError) as err:
                logger.debug("Base cache cannot be cropped (%s); rebuilding it from the full prefix.", err)
                return False
        self.ids = self.ids[:, :keep]
        self.mask = self.mask[:, :keep]
        self._next_position = None
        for k in [k for k in self._memo if k > keep]:
            del self._memo[k]
        return True

    def _reorder_beams(self, ids: torch.Tensor) -> None:
        """Match every row to the row of the previous step it continues (within its batch element) and reorder."""
        rows, consumed = self.ids.shape
        beams = self.num_beams
        if rows % beams != 0:
            raise ValueError(f"generate runs {rows} rows, not a multiple of `num_beams` (={beams}).")
        groups = rows // beams
        prev = self.ids.view(groups, 1, beams, consumed)
        cur = ids[:, :consumed].view(groups, beams, 1, consumed)
        match = (cur == prev).all(-1)  # (groups, beams, beams): row i continues row j
        self._accumulate_check(match.any(-1))
        src = match.int().argmax(-1) + torch.arange(groups, device=ids.device).unsqueeze(-1) * beams
        beam_idx = src.view(-1)
        self.cache.reorder_cache(beam_idx)
        self.mask = self.mask.index_select(0, beam_idx)
        self.ids = self.ids.index_select(0, beam_idx)
        if self._next_position is not None:
            self._next_position = self._next_position.index_select(0, beam_idx)
        self.last_reorder = beam_idx
        self.stats["reorder"] += 1

    def _accumulate_check(self, same: torch.Tensor) -> None:
        ok = same.all()
        self._ok = ok if self._ok is None else (self._ok & ok)
        self._unchecked += 1
        if self.device.type == "cpu" or (self.check_every and self._unchecked >= self.check_every):
            self.check()

    def check(self) -> None:
        """Read back the device-side prefix check; raise if the cache ever fell out of step with generate."""
        if self._ok is not None:
            ok = bool(self._ok)
            self._ok = None
            self._unchecked = 0
            if not ok:
                raise RuntimeError(
                    "The base model's cache fell out of step with generate: a row's tokens are not a continuation of "
                    "what the processor saw at the previous step. Use one DirectionalLogitsProcessor per generate "
                    "call (or call `.reset()`), and pass `num_beams=` to it for beam search."
                )
