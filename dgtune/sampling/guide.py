"""Rule guides for verifier-guided sampling: a task's hard constraints as a check on the tokens a step commits.

Protocol (what `sample(..., guide=)` takes): `guide(tokens [a, l], fixed [a, l], rows [a]) -> reject [a, l]`,
where `rows` are the indices, in the batch given to `sample`, of the `a` rows still being denoised (the fast
sampler drops finished rows), so a guide can hold different constraints for every row (a graph per prompt).
A task builds one with `make_guide(tokenizer, rows)` for the rows of one batch. A guide may also have
`forbidden(tokens, fixed, rows) -> (ids [k], taken [a, l, k])`: the top-k strategies then never choose a value
token a position may not take (its logit is -inf for the step's choice; the self-conditioning input keeps the
model's own logits), so a vetoed value is not drawn again.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class NotEqualGuide:
    """The guide of "these canvas positions hold different values" (Sudoku peers, the ends of a graph edge).

    conflict: bool [b, l, l] (one matrix per row of the batch) or [l, l] (the same for every row), symmetric;
    value_of: long [vocab] mapping a token id to its value, 0 = no value (never clashes). Called as a guide it flags
    every fixed position whose value equals the value of a fixed position it conflicts with (both ends);
    `forbidden` says, before a step chooses, which tokens each position cannot take (constrained decoding)."""

    def __init__(self, conflict: torch.Tensor, value_of: torch.Tensor):
        self.conflict, self.value_of = conflict.bool(), value_of.long()
        self.ids = (self.value_of > 0).nonzero().squeeze(1)  # [k] the value tokens
        self.n_values = int(self.value_of.max()) + 1  # (read once here, not a host sync every sampler step)

    def _rows(self, rows: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
        if self.conflict.device != device:  # moved once, not copied to the device every step
            self.conflict, self.value_of, self.ids = (x.to(device) for x in (self.conflict, self.value_of, self.ids))
        c = self.conflict
        return (c[rows.to(device)] if c.dim() == 3 else c[None]), self.value_of  # [a|1, l, l], [vocab]

    def __call__(self, tokens: torch.Tensor, fixed: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """reject [a, l]: fixed positions whose value clashes with a fixed conflicting position."""
        c, value_of = self._rows(rows, tokens.device)
        d = value_of[tokens] * fixed  # [a, l], 0 = not fixed / no value
        clash = (d[:, :, None] == d[:, None, :]) & (d[:, :, None] > 0) & c  # [a, l, l]
        return clash.any(-1)

    def forbidden(self, tokens: torch.Tensor, fixed: torch.Tensor, rows: torch.Tensor):
        """(ids [k], taken bool [a, l, k]): the k value tokens, and which of them each position may not take because
        a fixed conflicting position holds that value. A position whose every value is taken (a dead end) forbids
        nothing: the veto and the verifier then judge it. [a, l, k], not [a, l, vocab]: a 262k vocabulary stays
        out of it."""
        c, value_of = self._rows(rows, tokens.device)
        ids = self.ids
        d = value_of[tokens] * fixed  # [a, l], 0 = not fixed / no value
        held = F.one_hot(d, self.n_values).float()  # [a, l, n_values]
        taken = torch.einsum("aij,ajk->aik", c.float().expand(d.shape[0], -1, -1), held) > 0  # [a, l, n_values]
        taken = taken[..., value_of[ids]]  # [a, l, k] per value token
        dead = taken.all(-1, keepdim=True)  # [a, l, 1]
        return ids, taken & ~dead


def not_equal_guide(conflict: torch.Tensor, value_of: torch.Tensor) -> NotEqualGuide:
    """A `NotEqualGuide` (see there) for these conflicts and token values."""
    return NotEqualGuide(conflict, value_of)


def digit_values(tokenizer, digits: range) -> torch.Tensor:
    """long [vocab]: the token id of each digit string in `digits` -> that digit, every other token -> 0."""
    value_of = torch.zeros(len(tokenizer), dtype=torch.long)
    for d in digits:
        value_of[tokenizer.convert_tokens_to_ids(str(d))] = d
    return value_of
