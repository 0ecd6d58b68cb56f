"""Graph colouring: colour the vertices of a small graph with k colours so that no edge joins two equal colours.

A constraint puzzle where every answer position constrains others anywhere in the canvas (bidirectional
refinement). Vertices are the letters a, b, c, ...; prompt `color:<k>;ab,ac,bd,...` (edges sorted); answer: each
vertex label followed by its colour digit 1..k, in label order, e.g. `a1b2c2d1`. The labels are the canvas
template (`use_template`), so the model only writes the colours. Every instance has a planted proper colouring (the
reference, colours renumbered by first appearance); any proper colouring is right: the grade follows the rules.
Difficulty knob: vertex count, colours and edge probability (`ColoringLevel`).
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass

from dgtune.tasks.registry import register_task
from dgtune.tasks.structured import (StructuredTask, levels_from, make_row, split_counts, split_seed,
                                     structured_args)

PREFIX = "color:"
LABELS = string.ascii_lowercase


@dataclass(frozen=True)
class ColoringLevel:
    """One difficulty level: `vertices` vertices, `colors` colours, each pair of differently planted-coloured
    vertices joined with probability `edge_prob`; graphs with an isolated vertex are redrawn."""

    vertices: int = 6
    colors: int = 3
    edge_prob: float = 0.5

    def __post_init__(self):
        if not 2 <= self.vertices <= len(LABELS) or not 2 <= self.colors <= 9 or not 0 < self.edge_prob <= 1:
            raise ValueError(f"bad colouring level {self}: need 2 <= vertices <= 26, 2 <= colors <= 9, 0 < edge_prob <= 1")


DEFAULT_LEVELS = {"v6": {"vertices": 6}, "v8": {"vertices": 8}, "v10": {"vertices": 10}}


def canonical(colours: list[int]) -> list[int]:
    """Colours renumbered 1, 2, ... in order of first appearance (one representative per colour permutation)."""
    names: dict[int, int] = {}
    return [names.setdefault(c, len(names) + 1) for c in colours]


def generate(level: ColoringLevel, rng: random.Random, max_tries: int = 10_000) -> tuple[list[tuple[int, int]], list[int]]:
    """(edges, planted colouring): a random colouring using every colour, edges across colour classes."""
    n, k = level.vertices, level.colors
    for _ in range(max_tries):
        colours = [rng.randint(1, k) for _ in range(n)]
        if len(set(colours)) < min(k, n):
            continue
        edges = [(u, v) for u in range(n) for v in range(u + 1, n)
                 if colours[u] != colours[v] and rng.random() < level.edge_prob]
        if {x for e in edges for x in e} == set(range(n)):
            return edges, canonical(colours)
    raise RuntimeError(f"no colouring instance for {level} in {max_tries} tries")


def format_prompt(edges: list[tuple[int, int]], colors: int) -> str:
    """`color:<k>;ab,ac,...`"""
    return f"{PREFIX}{colors};" + ",".join(LABELS[u] + LABELS[v] for u, v in edges)


def format_answer(colours: list[int]) -> str:
    """`a1b2c1...`"""
    return "".join(LABELS[i] + str(c) for i, c in enumerate(colours))


def parse_answer(text: str, n: int, k: int) -> list[int] | None:
    """The colours of `a<c>b<c>...` for n vertices with colours 1..k, or None if malformed."""
    s = text.strip()
    if len(s) != 2 * n or any(s[2 * i] != LABELS[i] for i in range(n)):
        return None
    digits = s[1::2]
    if any(not d.isdigit() or not 1 <= int(d) <= k for d in digits):
        return None
    return [int(d) for d in digits]


def verify(edges: list[tuple[int, int]], n: int, k: int, output: str) -> dict[str, float]:
    """`parse_fail` (not n labelled colours in 1..k), `cell_acc` (share of edges with different colours at their
    ends), `solved` (all of them: a proper k-colouring)."""
    colours = parse_answer(output, n, k)
    if colours is None:
        return {"solved": 0.0, "cell_acc": 0.0, "parse_fail": 1.0}
    ok = sum(colours[u] != colours[v] for u, v in edges) / max(len(edges), 1)
    return {"solved": float(ok == 1.0), "cell_acc": ok, "parse_fail": 0.0}


def chance_solved(edges: list[tuple[int, int]], n: int, k: int) -> float:
    """Probability that uniformly random colours 1..k (one per vertex) form a proper colouring: the number of proper
    colourings over k^n, counted vertex by vertex (exact; fine for the small graphs here)."""
    counts = {(): 1}  # colours of vertices 0..v-1 -> how many ways (all proper so far)
    for v in range(n):
        earlier = [u for u, w in edges if w == v] + [w for u, w in edges if u == v and w < v]
        counts = {c + (x,): m for c, m in counts.items() for x in range(k) if all(c[u] != x for u in earlier)}
    return len(counts) / k ** n


def parse_prompt(prompt: str) -> tuple[list[tuple[int, int]], int, int]:
    """(edges, vertices, colours) of `color:<k>;ab,ac,...`; ValueError saying what is wrong."""
    body = prompt.strip()
    if not body.startswith(PREFIX) or ";" not in body:
        raise ValueError(f"prompt {prompt[:30]!r} must look like '{PREFIX}<k>;ab,ac,...'")
    k, _, edge_text = body[len(PREFIX):].partition(";")
    if not k.isdigit() or not 2 <= int(k) <= 9:
        raise ValueError(f"prompt {prompt[:30]!r}: the colour count must be a digit 2-9")
    edges = []
    for e in edge_text.split(","):
        if len(e) != 2 or e[0] not in LABELS or e[1] not in LABELS or e[0] == e[1]:
            raise ValueError(f"prompt edge {e!r} must be two different letters")
        edges.append((LABELS.index(e[0]), LABELS.index(e[1])))
    return edges, max(max(e) for e in edges) + 1, int(k)


class ColoringTask(StructuredTask):
    """Graph colouring with difficulty levels (`levels`: bucket name -> ColoringLevel fields); `use_template`
    puts the vertex labels in the canvas."""

    name = "coloring"

    def __init__(self, levels: dict | None = None, canvas_length: int | None = None, use_template: bool = False):
        self.levels = levels_from(levels, ColoringLevel, DEFAULT_LEVELS)
        self.use_template = use_template
        self.canvas_length = canvas_length or 2 * max(lv.vertices for lv in self.levels.values()) + 1

    def build_split(self, split: str, n: int, seed: int) -> list[dict]:
        """`n` rows spread evenly over the levels; each planted colouring is checked by the verifier."""
        rng = random.Random(split_seed(split, seed))
        rows = []
        for bucket, count in split_counts(n, list(self.levels)).items():
            lv = self.levels[bucket]
            for _ in range(count):
                edges, colours = generate(lv, rng)
                answer = format_answer(colours)
                if verify(edges, lv.vertices, lv.colors, answer)["solved"] != 1.0:
                    raise AssertionError(f"planted colouring {answer} breaks an edge of {edges}")
                rows.append(make_row(self.name, format_prompt(edges, lv.colors), answer, bucket, str(lv.vertices),
                                     answer, len(edges)))
        return rows

    def row_from_prompt(self, prompt: str) -> dict:
        """The row of a prompt `color:<k>;ab,...` (graded by the rules, no reference)."""
        _, n, _ = parse_prompt(prompt)
        return make_row(self.name, prompt.strip(), "", "", str(n), "", 0)

    def canvas_template(self, row: dict) -> list[str | None]:
        """The vertex labels at even positions; None = a colour."""
        return [x for i in range(int(row["puzzle"])) for x in (LABELS[i], None)]

    def make_guide(self, tokenizer, rows: list[dict]):
        """A rule checker for verifier-guided sampling (`dgtune.sampling.guide`), one graph per row: flags fixed
        colours equal to the fixed colour of a neighbour (vertex i's colour sits at canvas position 2i + 1)."""
        import torch

        from dgtune.sampling.guide import digit_values, not_equal_guide

        conflict = torch.zeros(len(rows), self.canvas_length, self.canvas_length, dtype=torch.bool)  # [b, l, l]
        colours = 2
        for r, row in enumerate(rows):
            edges, _, k = parse_prompt(row["prompt"])
            colours = max(colours, k)
            for u, v in edges:
                conflict[r, 2 * u + 1, 2 * v + 1] = conflict[r, 2 * v + 1, 2 * u + 1] = True
        # values = the colours 1..k, so a vertex whose k colours are all taken is a dead end (nothing forbidden)
        return not_equal_guide(conflict, digit_values(tokenizer, range(1, colours + 1)))

    def grade(self, row: dict, output: str) -> dict[str, float]:
        """The rules (`verify`) and `exact` = the planted colouring itself."""
        edges, _, k = parse_prompt(row["prompt"])
        out = verify(edges, int(row["puzzle"]), k, output)
        out["exact"] = float(output.strip() == row["response"])
        return out


@register_task("coloring")
def build_coloring(cfg) -> ColoringTask:
    """`task=coloring`: levels (buckets), canvas length, canvas template."""
    return ColoringTask(*structured_args(cfg))
