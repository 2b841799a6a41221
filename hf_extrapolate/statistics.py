"""Replacement statistics of a generation, indexed by the absolute position of the predicted token.

`ReplacementStats` stores, for every row and generated position, the replaced mass `M` (the probability that the
token at that position is a redraw from the replacement distribution) and, once the token is known, the posterior
probability that *this* token was a redraw, `M r(y) / q(y)` (exactly 0 or 1 for greedy decoding). Positions are
overwritten when assisted decoding re-evaluates them, and rows are reordered with beam search.

It holds no model and does no decoding: `hf_extrapolate.processor` feeds it.
"""

from __future__ import annotations

from collections.abc import Sequence

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
    """Per-row, per-position replaced mass and replaced-token posterior of one generation."""

    def __init__(self) -> None:
        self.reset(0)

    def reset(self, prompt_length: int) -> None:
        self.prompt_length = prompt_length
        self.mass: torch.Tensor | None = None  # (R, capacity)
        self.posterior: torch.Tensor | None = None  # (R, capacity), NaN until the token is known
        self.last_position = prompt_length - 1  # absolute index of the last predicted token

    def _ensure(self, rows: int, column: int, device: torch.device) -> None:
        if self.mass is None or self.mass.shape[0] != rows:
            cap = max(64, column + 1)
            self.mass = torch.zeros(rows, cap, device=device)
            self.posterior = torch.full((rows, cap), float("nan"), device=device)
        elif column >= self.mass.shape[1]:
            grow = max(column + 1, 2 * self.mass.shape[1]) - self.mass.shape[1]
            self.mass = torch.cat([self.mass, self.mass.new_zeros(rows, grow)], dim=1)
            self.posterior = torch.cat([self.posterior, self.posterior.new_full((rows, grow), float("nan"))], dim=1)

    def record(self, position: int, mass: torch.Tensor) -> None:
        """Store the replaced mass (R,) of the token to be generated at absolute index `position`."""
        column = position - self.prompt_length
        self._ensure(mass.shape[0], column, mass.device)
        self.mass[:, column] = mass
        self.posterior[:, column] = float("nan")
        self.last_position = position

    def record_posterior(self, position: int, posterior: torch.Tensor) -> None:
        """Store the probability (R,) that the token now at absolute index `position` was a redraw."""
        column = position - self.prompt_length
        if self.posterior is not None and 0 <= column < self.posterior.shape[1]:
            self.posterior[:, column] = posterior

    def reorder(self, beam_idx: torch.Tensor) -> None:
        if self.mass is not None:
            idx = beam_idx.to(self.mass.device)
            self.mass = self.mass.index_select(0, idx)
            self.posterior = self.posterior.index_select(0, idx)

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
