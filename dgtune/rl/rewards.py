"""Rewards for `method=rl` from the task's own verifier: a weighted sum of its grades.

`method.reward` weighs the grades `task.grade` returns (each in [0, 1]): `solved` (the rules hold), `cell_acc`
(partial credit), `exact` (the reference itself; 0 for rows without one) and `parse_fail` (a negative weight is a
penalty). `method.reward_fn=package.module:function` replaces the task's grade for `task=data` and your own tasks:
`(row, output) -> bool | number in [0, 1] | dict of those grades`, called and checked as verifiers are
(`dgtune.tasks.base.call_verifier`): an exception, a NaN or a value outside [0, 1] is a VerifierError naming the
function and the row.
"""

from __future__ import annotations

import math

from dgtune.errors import ConfigError, VerifierError
from dgtune.tasks.base import GRADE_KEYS, call_verifier, load_verifier


def check_weights(weights: dict) -> dict[str, float]:
    """`method.reward` as {grade: weight}, only known grades, finite weights (ConfigError naming the key)."""
    out = {}
    for key, w in dict(weights).items():
        if key not in GRADE_KEYS:
            raise ConfigError(f"method.reward.{key}: not a grade (expected any of {', '.join(GRADE_KEYS)})")
        if w is None or not math.isfinite(float(w)):
            raise ConfigError(f"method.reward.{key}={w!r}: must be a finite number")
        out[key] = float(w)
    if not any(out.values()):
        raise ConfigError("method.reward: every weight is 0, so every reward would be 0")
    return out


class Rewarder:
    """reward(row, output text) -> float: the weighted grades of `task.grade` or of `method.reward_fn`."""

    def __init__(self, task, weights: dict, reward_fn: str | None = None):
        self.task, self.weights = task, check_weights(weights)
        self.fn = load_verifier(reward_fn) if reward_fn else None

    def grades(self, row: dict, output: str) -> dict[str, float]:
        """The grades the reward weighs (checked: finite, in [0, 1])."""
        if self.fn is not None:
            verdict = call_verifier(self.fn, row, output.strip())
            return verdict if isinstance(verdict, dict) else {"solved": verdict}
        from dgtune.eval.runner import grade_row

        return grade_row(self.task, row, output)

    def __call__(self, row: dict, output: str) -> tuple[float, dict[str, float]]:
        """(reward, grades) of one completion."""
        g = self.grades(row, output)
        r = sum(w * float(g.get(k) or 0.0) for k, w in self.weights.items())
        if not math.isfinite(r):
            where = row.get("source") or f"the row with prompt {row.get('prompt', '')[:60]!r}"
            raise VerifierError(f"reward {r!r} is not finite (grades {g}) on {where}")
        return r, g
