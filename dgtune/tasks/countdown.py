"""Countdown (as in d1): reach a target with some of the given numbers and + - * and division.

The bundled tokenizer has no `/`, so division is written `:` (the ÷ of school notation): `(7+5):3`. An answer is
one arithmetic expression (no `=`, no unary minus); the verifier parses it with exact rational arithmetic, checks
that it uses only given numbers, each at most once (`require_all=True`: each exactly once, d1's rule), and that it
equals the target. Several expressions are usually right: the grade follows the rules, the reference is one of them.
Prompt: `countdown:<target>;<n1>,<n2>,...`; no canvas template (an expression has no fixed structure).
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from fractions import Fraction

from dgtune.errors import ConfigError
from dgtune.tasks.registry import register_task
from dgtune.tasks.structured import (StructuredTask, levels_from, make_row, split_counts, split_seed,
                                     structured_args)

PREFIX = "countdown:"
OPS = "+-*:"


@dataclass(frozen=True)
class CountdownLevel:
    """One difficulty level: `count` numbers drawn from 1..max_num, a target in [min_target, max_target] that is
    not itself one of the numbers."""

    count: int = 3
    max_num: int = 9
    min_target: int = 10
    max_target: int = 99

    def __post_init__(self):
        if self.count < 2 or self.max_num < 1 or not 1 <= self.min_target <= self.max_target:
            raise ValueError(f"bad countdown level {self}: need count >= 2, max_num >= 1, 1 <= min_target <= max_target")


DEFAULT_LEVELS = {"n2": {"count": 2}, "n3": {"count": 3}, "n4": {"count": 4}}


class CountdownError(ValueError):
    """An expression that is not well formed (or a malformed prompt)."""


def parse_expression(text: str) -> tuple[Fraction, list[int]]:
    """(value, numbers used) of an expression over integers with + - * : and parentheses (spaces ignored).
    Raises CountdownError if it is malformed, writes a number with a leading zero ("04": d1's checker evaluates the
    expression with Python, where that is a syntax error) or divides by zero."""
    s = text.replace(" ", "")
    pos = 0

    def peek() -> str:
        return s[pos] if pos < len(s) else ""

    def number() -> tuple[Fraction, list[int]]:
        nonlocal pos
        start = pos
        while peek().isdigit():
            pos += 1
        if start == pos:
            raise CountdownError(f"expected a number or '(' at position {start} of {text!r}")
        if s[start] == "0" and pos - start > 1:  # "04" is not how the numbers are written (Python, d1's checker)
            raise CountdownError(f"number {s[start:pos]!r} with a leading zero at position {start} of {text!r}")
        v = int(s[start:pos])
        return Fraction(v), [v]

    def factor() -> tuple[Fraction, list[int]]:
        nonlocal pos
        if peek() == "(":
            pos += 1
            v, used = expr()
            if peek() != ")":
                raise CountdownError(f"missing ')' at position {pos} of {text!r}")
            pos += 1
            return v, used
        return number()

    def term() -> tuple[Fraction, list[int]]:
        nonlocal pos
        v, used = factor()
        while peek() in ("*", ":"):
            op = s[pos]
            pos += 1
            w, more = factor()
            if op == ":" and w == 0:
                raise CountdownError(f"division by zero in {text!r}")
            v, used = (v * w if op == "*" else v / w), used + more
        return v, used

    def expr() -> tuple[Fraction, list[int]]:
        nonlocal pos
        v, used = term()
        while peek() in ("+", "-"):
            op = s[pos]
            pos += 1
            w, more = term()
            v, used = (v + w if op == "+" else v - w), used + more
        return v, used

    if not s:
        raise CountdownError("empty expression")
    value, used = expr()
    if pos != len(s):
        raise CountdownError(f"unexpected {s[pos]!r} at position {pos} of {text!r}")
    return value, used


def verify(numbers: list[int], target: int, output: str, require_all: bool = False) -> dict[str, float]:
    """Grade one answer: `solved` (well formed, only given numbers, each at most once, or exactly once with
    `require_all`, and equal to the target), `cell_acc` (well formed and the numbers rule holds: a legal
    expression, whatever its value), `parse_fail`."""
    try:
        value, used = parse_expression(output.strip())
    except CountdownError:
        return {"solved": 0.0, "cell_acc": 0.0, "parse_fail": 1.0}
    have, want = Counter(used), Counter(numbers)
    legal = (have == want) if require_all else all(have[k] <= want[k] for k in have)
    return {"solved": float(legal and value == target), "cell_acc": float(legal), "parse_fail": 0.0}


_PREC = {"+": 1, "-": 1, "*": 2, ":": 2}


def _combine(a: tuple, b: tuple, op: str) -> tuple | None:
    """(value, text, precedence) of `a op b` with the fewest parentheses; None unless the value is a positive
    integer (intermediate results stay positive whole numbers, as in the game)."""
    (va, ta, pa), (vb, tb, pb) = a, b
    value = {"+": va + vb, "-": va - vb, "*": va * vb, ":": va / vb}[op]
    if value <= 0 or value.denominator != 1:
        return None
    left = f"({ta})" if pa < _PREC[op] else ta
    right_needs = pb < _PREC[op] or (pb == _PREC[op] and op in "-:")
    right = f"({tb})" if right_needs else tb
    return value, f"{left}{op}{right}", _PREC[op]


def generate(level: CountdownLevel, rng: random.Random, max_tries: int = 10_000) -> tuple[list[int], int, str]:
    """(numbers, target, reference expression): random numbers, combined pairwise in random order with random
    operators until one expression uses them all; redrawn until the target fits the level."""
    for _ in range(max_tries):
        numbers = [rng.randint(1, level.max_num) for _ in range(level.count)]
        pool = [(Fraction(v), str(v), 3) for v in numbers]
        while len(pool) > 1:
            i, j = rng.sample(range(len(pool)), 2)
            made = _combine(pool[i], pool[j], rng.choice(OPS))
            if made is None:
                break
            pool = [p for k, p in enumerate(pool) if k not in (i, j)] + [made]
        if len(pool) != 1:
            continue
        target = int(pool[0][0])
        if level.min_target <= target <= level.max_target and target not in numbers:
            return numbers, target, pool[0][1]
    raise RuntimeError(f"no countdown instance for {level} in {max_tries} tries")


def format_prompt(numbers: list[int], target: int) -> str:
    """`countdown:<target>;<n1>,<n2>,...`"""
    return f"{PREFIX}{target};{','.join(map(str, numbers))}"


class CountdownTask(StructuredTask):
    """Countdown with difficulty levels (`levels`: bucket name -> CountdownLevel fields). Train, val and test rows
    are spread evenly over the levels; every generated reference is checked by the verifier."""

    name = "countdown"
    use_template = False

    def __init__(self, levels: dict | None = None, canvas_length: int | None = None, require_all: bool = False):
        self.levels = levels_from(levels, CountdownLevel, DEFAULT_LEVELS)
        self.require_all = require_all
        widest = max(lv.count * len(str(lv.max_num)) + 3 * lv.count - 3 for lv in self.levels.values())
        self.canvas_length = canvas_length or widest + 1  # digits, count-1 operators, at most count-2 paren pairs, EOS

    def build_split(self, split: str, n: int, seed: int) -> list[dict]:
        """`n` rows spread evenly over the levels, reproducible for (split, seed)."""
        rng = random.Random(split_seed(split, seed))
        rows = []
        for bucket, k in split_counts(n, list(self.levels)).items():
            for _ in range(k):
                numbers, target, ref = generate(self.levels[bucket], rng)
                if verify(numbers, target, ref, self.require_all)["solved"] != 1.0:
                    raise AssertionError(f"generated reference {ref!r} does not reach {target} with {numbers}")
                rows.append(self._row(numbers, target, ref, bucket))
        return rows

    def _row(self, numbers: list[int], target: int, ref: str, bucket: str) -> dict:
        return make_row(self.name, format_prompt(numbers, target), ref, bucket, ",".join(map(str, numbers)), str(target),
                        len(numbers))

    def row_from_prompt(self, prompt: str) -> dict:
        """The row of a prompt `countdown:<target>;<n1>,<n2>,...` (graded by the rules, no reference)."""
        body = prompt.strip()
        if not body.startswith(PREFIX) or ";" not in body:
            raise CountdownError(f"prompt {prompt[:30]!r} must look like '{PREFIX}<target>;<n1>,<n2>,...'")
        target, _, nums = body[len(PREFIX):].partition(";")
        try:
            numbers = [int(x) for x in nums.split(",")]
            return self._row(numbers, int(target), "", "")
        except ValueError:
            raise CountdownError(f"prompt {prompt!r}: target and numbers must be whole numbers") from None

    def load_test_file(self, path: str) -> list[dict]:
        """Test rows from a file: d1's JSON lines (`{"input": "30,100,93", "output": "23"}`: the numbers and the
        target, read as they are; `dllm-reasoning/d1`'s `countdown_cd3_test.jsonl`) when it ends in `.jsonl`, else
        one prompt `countdown:<target>;<n1>,...` a line. A malformed line names the file and line."""
        if not str(path).endswith(".jsonl"):
            return super().load_test_file(path)
        import json
        from pathlib import Path

        from dgtune.errors import InputError

        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"test file {p} does not exist")
        rows = []
        for lineno, line in enumerate(p.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                numbers = [int(x) for x in str(obj["input"]).split(",")]
                target = int(obj["output"])
            except (ValueError, KeyError, TypeError) as e:
                raise InputError(f"{p}:{lineno}: expected {{\"input\": \"n1,n2,...\", \"output\": \"target\"}} "
                                 f"({type(e).__name__}: {e})") from None
            rows.append({**self._row(numbers, target, "", f"n{len(numbers)}"), "source": f"{p}:{lineno}"})
        return rows

    def relabel(self, row: dict, output: str) -> dict | None:
        """Hindsight (`method.hindsight`): the row that `output` solves, or None. A legal expression (the numbers
        rule of `verify`) whose value is a whole number in the row's level's target range and not one of the
        numbers is a verified solution of the puzzle with that value as its target, whatever target it missed."""
        numbers = [int(x) for x in row["puzzle"].split(",")]
        try:
            value, used = parse_expression(output.strip())
        except CountdownError:
            return None
        have, want = Counter(used), Counter(numbers)
        if not ((have == want) if self.require_all else all(have[k] <= want[k] for k in have)):
            return None
        level = self.levels.get(row["bucket"])
        lo, hi = (level.min_target, level.max_target) if level else (1, max(lv.max_target for lv in self.levels.values()))
        if value.denominator != 1 or not lo <= value <= hi or int(value) in numbers:
            return None
        return {**row, **self._row(numbers, int(value), output.strip(), row["bucket"]), "source": row.get("source", "")}

    def grade(self, row: dict, output: str) -> dict[str, float]:
        """The rules (`verify`) and `exact` = the reference expression itself."""
        numbers = [int(x) for x in row["puzzle"].split(",")]
        out = verify(numbers, int(row["solution"]), output, self.require_all)
        out["exact"] = float(output.replace(" ", "").strip() == row["response"])
        return out


@register_task("countdown")
def build_countdown(cfg) -> CountdownTask:
    """`task=countdown`: levels (buckets), canvas length, `task.require_all`."""
    levels, canvas, template = structured_args(cfg)
    if template:
        raise ConfigError("countdown has no canvas template (an expression has no fixed structure); set task.template=false")
    return CountdownTask(levels, canvas, bool(cfg.get("require_all", False)))
