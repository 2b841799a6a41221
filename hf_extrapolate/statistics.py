"""Replacement statistics of a generation, indexed by the absolute position of the predicted token.

`ReplacementStats` stores, for every row and generated position, the replaced mass `M` (the probability that the
token at that position is a redraw from the replacement distribution) and, once the token is known, the posterior
probability that *this* token was a redraw, `M r(y) / q(y)` (exactly 0 or 1 for greedy decoding). Positions are
overwritten when assisted decoding re-evaluates them, and rows are reordered with beam search.

It holds no model and does no decoding: `hf_extrapolate.processor` feeds it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def _eos_tensor(eos_token_id: int | Sequence[int] | torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    if eos_token_id is None:
        return None
    eos = torch.as_tensor(eos_token_id, device=device).flatten()
    return eos if eos.numel() else None


def generated_mask(
    tokens: torch.Tensor, prompt_length: int, eos_token_id: int | Sequence[int] | torch.Tensor | None
) -> torch.Tensor:
    """Which generated positions are real tokens: (R, N) ids -> (R, N - prompt_length) bool.

    A position counts up to and including the row's first end-of-sequence token; the padding after it does not.
    """
    gen = tokens[:, prompt_length:]
    eos = _eos_tensor(eos_token_id, tokens.device)
    if eos is None:
        return torch.ones_like(gen, dtype=torch.bool)
    is_eos = torch.isin(gen, eos)
    eos_before = (is_eos.long().cumsum(-1) - is_eos.long()) > 0
    return ~eos_before


class ReplacementStats:
    """Per-row, per-position replaced mass and replaced-token posterior of one generation.

    Recording a step issues no tensor operation: the step's (R,) tensors are kept by position and written into the
    dense (R, n) `mass` / `posterior` tables when those are read (or rows are reordered). The posterior of a sampled
    token is kept as its factors (`M`, `log q(y)`, `r(y)`) and formed then, for all positions at once. A recorded
    tensor must not be modified afterwards (the processor passes fresh ones).
    """

    def __init__(self) -> None:
        self.reset(0)

    def reset(self, prompt_length: int) -> None:
        self.prompt_length = prompt_length
        self._mass: torch.Tensor | None = None  # (R, capacity), dense part
        self._posterior: torch.Tensor | None = None  # (R, capacity), NaN until the token is known
        self._new_mass: dict[int, torch.Tensor] = {}  # column -> (R,), not yet in the dense table
        # column -> None (unknown: NaN), a (R,) posterior, or the factors (M, log q(y), r(y), r is log r)
        self._new_posterior: dict[int, Any] = {}
        self._rows: int | None = None
        self._device: torch.device | None = None
        self._recorded = -1  # largest column recorded so far
        self.last_position = prompt_length - 1  # absolute index of the last predicted token

    # ------------------------------------------------------------------ recording (no tensor operations)
    def record(self, position: int, mass: torch.Tensor, posterior: torch.Tensor | None = None) -> None:
        """Store the replaced mass (R,) of the token to be generated at absolute index `position` (and, when it is
        already known, e.g. under greedy decoding, the posterior (R,) of that token)."""
        column = position - self.prompt_length
        rows = mass.shape[0]
        if self._rows != rows:  # a new row count: a new generation's table
            self._mass = self._posterior = None
            self._new_mass.clear()
            self._new_posterior.clear()
            self._rows, self._device, self._recorded = rows, mass.device, -1
        self._new_mass[column] = mass
        if posterior is not None:
            self._new_posterior[column] = posterior
        elif column <= self._recorded:  # re-evaluated (assisted decoding): its token is not known yet
            self._new_posterior[column] = None
        self._recorded = max(self._recorded, column)
        self.last_position = position

    def record_posterior_factors(
        self, position: int, mass: torch.Tensor, log_q: torch.Tensor, redraw: torch.Tensor | None, redraw_is_log: bool
    ) -> None:
        """The posterior `M r(y) / q(y)` of the token now at `position`, from its factors (each (R,) or (R, 1)):
        the replaced mass, `log q(y)` and `r(y)` (or `log r(y)` when `redraw_is_log`); or, with `redraw=None`,
        `log_q` of shape (R, 2) holding both columns. Formed when read."""
        column = position - self.prompt_length
        if 0 <= column <= self._recorded:
            if redraw is None and (log_q.dim() != 2 or log_q.shape[1] != 2):
                raise ValueError(f"`log_q` must be (rows, 2) when `redraw` is None, got {tuple(log_q.shape)}.")
            self._new_posterior[column] = (mass, log_q, redraw, redraw_is_log)  # a pair is split when read

    # ------------------------------------------------------------------ the dense tables
    def _materialize(self) -> None:
        if self._rows is None:
            return
        width = self._recorded + 1
        rows, device = self._rows, self._device
        if self._mass is None:
            cap = max(64, width)
            self._mass = torch.zeros(rows, cap, device=device)
            self._posterior = torch.full((rows, cap), float("nan"), device=device)
        elif width > self._mass.shape[1]:
            grow = max(width, 2 * self._mass.shape[1]) - self._mass.shape[1]
            self._mass = torch.cat([self._mass, self._mass.new_zeros(rows, grow)], dim=1)
            self._posterior = torch.cat([self._posterior, self._posterior.new_full((rows, grow), float("nan"))], 1)
        if self._new_mass:
            columns = list(self._new_mass)
            self._mass[:, columns] = torch.stack([self._new_mass[c].reshape(rows) for c in columns], dim=1).to(
                self._mass)
            self._new_mass.clear()
        if self._new_posterior:
            known, factors = {}, {False: [], True: []}
            for column, value in self._new_posterior.items():
                if value is None:
                    self._posterior[:, column] = float("nan")
                elif isinstance(value, tuple):
                    factors[value[3]].append(column)
                else:
                    known[column] = value
            if known:
                columns = list(known)
                self._posterior[:, columns] = torch.stack([known[c].reshape(rows) for c in columns], dim=1).to(
                    self._posterior)
            for is_log, columns in factors.items():
                if not columns:
                    continue
                parts = [self._new_posterior[c] for c in columns]
                parts = [(m, q[:, 0], q[:, 1]) if r is None else (m, q, r) for m, q, r, _ in parts]
                mass, log_q, redraw = (torch.stack([p[i].reshape(rows) for p in parts], dim=1).float()
                                       for i in range(3))
                log_r = redraw if is_log else redraw.log()
                post = (log_r - log_q).exp() * mass
                self._posterior[:, columns] = post.nan_to_num(0.0).clamp(0.0, 1.0).to(self._posterior)
            self._new_posterior.clear()

    @property
    def mass(self) -> torch.Tensor | None:
        """(R, capacity) replaced mass per generated column (zeros beyond the recorded ones); None before any step."""
        self._materialize()
        return self._mass

    @property
    def posterior(self) -> torch.Tensor | None:
        """(R, capacity) probability that the token at each generated column was a redraw; NaN where unknown."""
        self._materialize()
        return self._posterior

    def reorder(self, beam_idx: torch.Tensor) -> None:
        self._materialize()
        if self._mass is not None:
            idx = beam_idx.to(self._mass.device)
            self._mass = self._mass.index_select(0, idx)
            self._posterior = self._posterior.index_select(0, idx)

    def valid(self, tokens: torch.Tensor | None, eos_token_id, sequences: torch.Tensor | None = None) -> torch.Tensor:
        """(R, n) bool: generated, non-padding positions among the n recorded ones.

        `tokens` are the ids the processor saw last (they end just before the last predicted token); `sequences`,
        when given, are generate's output and also bound n (assisted decoding may have evaluated rejected drafts).
        """
        device = self.mass.device
        n = self.last_position - self.prompt_length + 1
        if sequences is not None:
            n = min(n, sequences.shape[1] - self.prompt_length)
            tokens = sequences
        if tokens is None:
            return torch.ones(self.mass.shape[0], n, dtype=torch.bool, device=device)
        tokens = tokens.to(device)
        missing = self.prompt_length + n - tokens.shape[1]
        if missing > 0:  # the last predicted token is not in `tokens`: a placeholder that is no EOS
            tokens = torch.cat([tokens, tokens.new_full((tokens.shape[0], missing), -1)], dim=1)
        return generated_mask(tokens, self.prompt_length, eos_token_id)[:, :n]

    def replace_ratio(self, tokens: torch.Tensor | None, eos_token_id, sequences: torch.Tensor | None = None) -> torch.Tensor:
        """Mean replaced mass over each row's generated non-padding positions: (R,). NaN for a row with none."""
        if self.mass is None:
            raise RuntimeError("No generation step has been recorded yet: call generate with this processor first.")
        if sequences is not None and sequences.shape[0] != self.mass.shape[0]:
            raise ValueError(
                f"`sequences` has {sequences.shape[0]} rows but the processor ran {self.mass.shape[0]}. Pass the "
                "`sequences` returned by this generate call (for beam search, statistics refer to the live beams; "
                "call replace_ratio() without sequences)."
            )
        valid = self.valid(tokens, eos_token_id, sequences)
        mass = self.mass[:, : valid.shape[1]]
        return (mass * valid).sum(-1) / valid.sum(-1)
