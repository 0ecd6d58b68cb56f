"""Rule guides for verifier-guided sampling: a task's hard constraints as a check on the tokens a step commits.

Protocol (what `sample(..., guide=)` takes): `guide(tokens [a, l], fixed [a, l], rows [a]) -> reject [a, l]`,
where `rows` are the indices, in the batch given to `sample`, of the `a` rows still being denoised (the fast
sampler drops finished rows), so a guide can hold different constraints for every row (a graph per prompt).
A task builds one with `make_guide(tokenizer, rows)` for the rows of one batch.
"""

from __future__ import annotations

import torch


def not_equal_guide(conflict: torch.Tensor, value_of: torch.Tensor):
    """The guide of "these canvas positions hold different values" (Sudoku peers, the ends of a graph edge).

    conflict: bool [b, l, l] (one matrix per row of the batch) or [l, l] (the same for every row), symmetric;
    value_of: long [vocab] mapping a token id to its value, 0 = no value (never clashes). The guide flags every
    fixed position whose value equals the value of a fixed position it conflicts with (both ends are flagged)."""
    conflict, value_of = conflict.bool(), value_of.long()

    def guide(tokens: torch.Tensor, fixed: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        c = conflict.to(tokens.device)
        c = c[rows.to(tokens.device)] if c.dim() == 3 else c[None]  # [a, l, l] or [1, l, l]
        d = value_of.to(tokens.device)[tokens] * fixed  # [a, l], 0 = not fixed / no value
        clash = (d[:, :, None] == d[:, None, :]) & (d[:, :, None] > 0) & c  # [a, l, l]
        return clash.any(-1)

    return guide


def digit_values(tokenizer, digits: range) -> torch.Tensor:
    """long [vocab]: the token id of each digit string in `digits` -> that digit, every other token -> 0."""
    value_of = torch.zeros(len(tokenizer), dtype=torch.long)
    for d in digits:
        value_of[tokenizer.convert_tokens_to_ids(str(d))] = d
    return value_of
