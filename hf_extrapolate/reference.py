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

from .cache_compat import cache_kwargs, output_cache

logger = logging.getLogger(__name__)

# positions whose base logits are kept once rollbacks were seen (assisted decoding re-verifies up to this many drafts)
MEMO_WINDOW = 32
# the attention mask buffer grows by at least this many columns at a time
MASK_GROWTH = 256


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


def _model_token(model: Any, name: str) -> Any:
    value = getattr(getattr(model, "generation_config", None), name, None)
    return value if value is not None else getattr(getattr(model, "config", None), name, None)


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module):
    model.eval()
    try:
        yield
    finally:
        model.train()


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
        pad_token_id: int | None = None,
        eos_token_id: int | list[int] | None = None,
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
        self.pad_token_id = pad_token_id if pad_token_id is not None else _model_token(model, "pad_token_id")
        self.eos_token_id = eos_token_id if eos_token_id is not None else _model_token(model, "eos_token_id")
        self.device = model_device(model)
        self.prompt_mask = attention_mask.to(self.device) if attention_mask is not None else None
        self.reset()

    # ------------------------------------------------------------------ state
    def reset(self, attention_mask: torch.Tensor | None = None) -> None:
        """Forget the cache (and optionally set a new prompt attention mask)."""
        if attention_mask is not None:
            self.prompt_mask = attention_mask.to(self.device)
        self.cache = None
        self._call_mask: torch.Tensor | None = None  # the exact (R, T) mask generate uses, for the next call only
        self._generation_mask: torch.Tensor | None = None  # (R, prompt_length) mask of the current generation
        self.ids: torch.Tensor | None = None  # (R, L) tokens the cache has consumed
        self.mask: torch.Tensor | None = None  # (R, L) their attention mask (a view of `_mask_buffer`)
        self._mask_buffer: torch.Tensor | None = None
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
        ids = input_ids if out_device == self.device else input_ids.to(self.device)
        rows, length = ids.shape
        self.last_reorder = None
        self.started_generation = False
        consumed = self.num_consumed

        if self.ids is None or rows != self.ids.shape[0]:
            self._generation_mask = self._prompt_mask_for(ids)
            logits = self._prefill(ids)
            new_generation = True
        elif length == consumed + 1 and length > self.prompt_length:
            if self.num_beams > 1:
                self._reorder_beams(ids)
            else:
                self._check_prefix(ids, consumed)
            logits = self._forward(ids, consumed)
            self.stats["fast"] += 1
            new_generation = False
        else:
            logits, new_generation = self._sync_slow(ids)
        self._call_mask = None
        if new_generation:
            self.prompt_length = length
            self.started_generation = True
        if logits.device != out_device or logits.dtype != torch.float32:
            logits = logits.to(out_device, torch.float32)
        return logits

    def set_call_mask(self, attention_mask: torch.Tensor | None) -> None:
        """The exact (rows, length) attention mask that generate uses for the tokens of the next call (read by
        `DirectionalLogitsProcessor` from the generate call). A new generation uses it and checks the mask given to
        the constructor / `reset` against it."""
        self._call_mask = None if attention_mask is None else attention_mask.to(self.device)

    # ------------------------------------------------------------------ internals
    def _prompt_mask_for(self, ids: torch.Tensor) -> torch.Tensor:
        """The validated (rows, length) attention mask of the prompt `ids` that begins a new generation.

        Sources, in order: the mask given to the constructor / `reset` (its rows repeated for
        `num_return_sequences` / `num_beams`), checked against generate's own mask when that is known; generate's
        mask; transformers' rule (padding tokens are masked when the pad token is not also an EOS token)."""
        rows, length = ids.shape
        call = self._call_mask
        if call is not None and (call.shape[0] != rows or call.shape[1] < length):
            call = None
        elif call is not None:
            call = call[:, :length].long()
        if self.prompt_mask is None:
            return call if call is not None else self._inferred_mask(ids)
        batch, width = self.prompt_mask.shape
        if rows % batch != 0:
            raise ValueError(
                f"`attention_mask` has batch size {batch}, but generate runs {rows} rows, which is not a multiple of it. "
                "Pass the attention mask of the same inputs you pass to generate (its rows are repeated for "
                "num_return_sequences / num_beams), or call `reset(attention_mask=...)` before a new generate call."
            )
        if width != length:
            raise ValueError(
                f"`attention_mask` covers {width} tokens but the prompt generate starts from has {length}: the mask does "
                "not belong to these inputs. Pass the mask of the inputs you generate from (`inputs['attention_mask']`), "
                "or `reset(attention_mask=...)` before a new generate call."
            )
        mask = self.prompt_mask.repeat_interleave(rows // batch, dim=0) if rows != batch else self.prompt_mask
        mask = mask.long()
        if call is not None:
            if not torch.equal(mask, call):
                raise ValueError(
                    "The `attention_mask` given to the processor differs from the one generate uses for these inputs "
                    "(a mask from an earlier batch?). Omit it (the processor reads generate's own) or call "
                    "`reset(attention_mask=inputs['attention_mask'])` before each new generate call."
                )
        elif self.pad_token_id is not None:
            not_padding = (mask == 0) & (ids != self.pad_token_id)
            leading_pad = (ids == self.pad_token_id).long().cumprod(-1).bool()
            attended_pad = leading_pad & (mask == 1) & (not self._pad_is_eos())
            if bool(not_padding.any() or attended_pad.any()):
                raise ValueError(
                    "`attention_mask` does not match the padding of these inputs (it masks tokens that are not the pad "
                    f"token {self.pad_token_id}, or attends leading pad tokens): it belongs to other inputs. Pass the mask "
                    "of the inputs you generate from, or `reset(attention_mask=...)` before a new generate call."
                )
        return mask

    def _pad_is_eos(self) -> bool:
        eos = self.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        return self.pad_token_id in eos

    def _inferred_mask(self, ids: torch.Tensor) -> torch.Tensor:
        """transformers' rule when no mask is given: mask the pad token unless it is also an EOS token."""
        pad = self.pad_token_id
        if pad is None or self._pad_is_eos() or not bool((ids == pad).any()):
            return torch.ones_like(ids, dtype=torch.long)
        return (ids != pad).long()

    def _row_mask(self, rows: int, length: int) -> torch.Tensor:
        """The attention mask (rows, length) of the current generation: its prompt mask, ones for generated columns."""
        mask = self._generation_mask
        if mask is None or mask.shape[0] != rows or mask.shape[1] > length:
            raise RuntimeError("The base model's cache has no prompt mask for these rows; call `reset()`.")
        width = mask.shape[1]
        if length == width:
            return mask
        return torch.cat([mask, mask.new_ones(rows, length - width)], dim=1)

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
        if full_mask is None:  # a continuation: generated columns are attended (ones already in the buffer)
            full_mask = self._attended(length)
            running = new == 1 and self._next_position is not None
        else:
            self._set_mask_buffer(full_mask)
            running = False
        if running:  # one new, attended token: its position is the running count (no cumsum over the prefix)
            positions = self._next_position
            next_position = positions + 1
        else:
            positions = (full_mask.cumsum(-1) - 1).masked_fill(full_mask == 0, 0)[:, start:]
            next_position = full_mask.sum(-1, keepdim=True)
        keep = min(length - start, MEMO_WINDOW) if self._keep_memo else 1
        # a base model left in train mode would run dropout: run it in eval mode for this forward, then restore
        mode = _eval_mode(self.model) if self.model.training else contextlib.nullcontext()
        with mode, self.forward_context():
            out = self.model(
                input_ids=ids[:, start:],
                attention_mask=full_mask,
                position_ids=positions,
                **cache_kwargs(self.cache),
                use_cache=True,
                logits_to_keep=keep,
            )
        self.cache = output_cache(out)
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

    def _set_mask_buffer(self, mask: torch.Tensor) -> None:
        """Keep `mask` (rows, length) at the start of a buffer whose further columns are ones (generated tokens), so
        that the fast path's mask is a view, not a concatenation."""
        rows, length = mask.shape
        self._mask_buffer = torch.cat([mask, mask.new_ones(rows, max(MASK_GROWTH, length))], dim=1)

    def _attended(self, length: int) -> torch.Tensor:
        """The mask of the consumed tokens extended by attended columns up to `length`: a view of the buffer."""
        buffer = self._mask_buffer
        if length > buffer.shape[1]:
            rows, width = buffer.shape
            self._mask_buffer = buffer = torch.cat([buffer, buffer.new_ones(rows, max(width, length - width))], dim=1)
        return buffer[:, :length]

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
        keep = min(common, length - 1)
        if new_generation:
            prompt_mask = self._prompt_mask_for(ids)
            self._generation_mask = prompt_mask
            # the cached prefix can serve the new prompt only where its attention mask is the same
            if keep == 0 or not torch.equal(self.mask[:, :keep], prompt_mask[:, :keep]):
                return self._prefill(ids), True
            self._keep_memo = True
            self.stats["rollback"] += 1
            if not self._truncate(keep):
                self.stats["rebuild"] += 1
                return self._prefill(ids), True
            return self._forward(ids, keep, full_mask=prompt_mask), True
        if common == length and length in self._memo:
            # every token already consumed and its logits still at hand (assisted decoding re-verifies drafts)
            return self._memo[length], False
        self._keep_memo = True  # rollbacks happen (assisted decoding): keep per-position logits from now on
        self.stats["rollback"] += 1
        if not self._truncate(keep):
            self.stats["rebuild"] += 1
            return self._prefill(ids), False
        return self._forward(ids, keep), False

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
        self._mask_buffer = self._mask_buffer.index_select(0, beam_idx)
        self.mask = self._mask_buffer[:, :consumed]
        self.ids = self.ids.index_select(0, beam_idx)
        if self._next_position is not None:
            self._next_position = self._next_position.index_select(0, beam_idx)
        self.last_reorder = beam_idx
        self.stats["reorder"] += 1

    def _check_prefix(self, ids: torch.Tensor, consumed: int) -> None:
        """The fast path's check that every row continues the consumed tokens: on CPU one comparison read at once,
        on accelerators accumulated on the device (`_accumulate_check`)."""
        if self.device.type == "cpu":
            if not torch.equal(ids[:, :consumed], self.ids):
                self._ok = torch.zeros((), dtype=torch.bool)
                self.check()
            return
        self._accumulate_check(ids[:, :consumed] == self.ids)

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
