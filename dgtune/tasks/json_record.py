"""Schema-constrained JSON: fill a fixed-schema record from a short text.

The record has five fields (`SCHEMA`): id (int 1-999), name (lowercase string or null), qty (int 1-99), price
(int 1-999 or null) and paid (bool). The text names them in short phrases ("order 17, for bob, 3 items, at 45 each,
not paid"), possibly shuffled, paraphrased, mixed with distractor numbers ("ref 12") or missing a nullable field.

The bundled tokenizer has no `{`, `}` or `"`, so the model writes JSON with `(`, `)` and `#` in their places; the
verifier maps them back (`to_json`, a one-to-one character substitution) and `json.loads` the result. Each value
sits in a slot of fixed width, right-padded with spaces (JSON whitespace), so keys and punctuation form a fixed
canvas template: `(#id#:___,#name#:________,#qty#:__,#price#:____,#paid#:_____)`. Verifier: valid JSON, exactly the
schema's keys with the right types, then each value against the text. Key order and spacing are free (without the
template several texts are right; the grade follows the rules).
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass

from dgtune.tasks.registry import register_task
from dgtune.tasks.structured import (StructuredTask, levels_from, make_row, split_counts, split_seed,
                                     structured_args)

PREFIX = "record:"
TO_JSON = str.maketrans({"(": "{", ")": "}", "#": '"'})
FROM_JSON = str.maketrans({"{": "(", "}": ")", '"': "#"})


@dataclass(frozen=True)
class Field:
    """One schema field: JSON key, kind ("int", "str", "bool"), slot width, phrasings of its value in the text."""

    key: str
    kind: str
    width: int
    phrases: tuple[str, ...]  # "{}" is the value; for bools: (true phrasings..., "|", false phrasings...)
    lo: int = 1
    hi: int = 999
    nullable: bool = False


SCHEMA = (
    Field("id", "int", 3, ("order {}", "id {}")),
    Field("name", "str", 8, ("for {}", "name {}"), nullable=True),
    Field("qty", "int", 2, ("qty {}", "{} items"), hi=99),
    Field("price", "int", 4, ("price {}", "at {} each"), nullable=True),
    Field("paid", "bool", 5, ("paid", "is paid", "|", "not paid", "unpaid")),
)
DISTRACTORS = ("day {}", "ref {}", "box {}")
CONSONANTS, VOWELS = "bdfgklmnprstvz", "aeiou"


@dataclass(frozen=True)
class RecordLevel:
    """One difficulty level: shuffle the phrases, vary their wording, add `distractors` phrases with numbers that
    belong to no field, drop each nullable field with probability `p_missing` (its value is then null)."""

    shuffle: bool = False
    paraphrase: bool = False
    distractors: int = 0
    p_missing: float = 0.0


DEFAULT_LEVELS = {
    "easy": {},
    "medium": {"shuffle": True, "paraphrase": True},
    "hard": {"shuffle": True, "paraphrase": True, "distractors": 2, "p_missing": 0.5},
}


def _phrases(field: Field, value) -> tuple[str, ...]:
    if field.kind == "bool":
        cut = field.phrases.index("|")
        return field.phrases[:cut] if value else field.phrases[cut + 1:]
    return tuple(p.format(value) for p in field.phrases)


def _random_value(field: Field, rng: random.Random):
    if field.kind == "bool":
        return rng.random() < 0.5
    if field.kind == "str":
        return "".join(rng.choice(CONSONANTS if i % 2 == 0 else VOWELS) for i in range(rng.randint(3, 6)))
    return rng.randint(field.lo, field.hi)


def generate(level: RecordLevel, rng: random.Random) -> tuple[str, dict]:
    """(text, record) for one level; the record is what the text says (null for fields it leaves out)."""
    record, phrases = {}, []
    for f in SCHEMA:
        if f.nullable and rng.random() < level.p_missing:
            record[f.key] = None
            continue
        record[f.key] = _random_value(f, rng)
        options = _phrases(f, record[f.key])
        phrases.append(rng.choice(options) if level.paraphrase else options[0])
    phrases += [rng.choice(DISTRACTORS).format(rng.randint(1, 99)) for _ in range(level.distractors)]
    if level.shuffle:
        rng.shuffle(phrases)
    return ", ".join(phrases), record


def _read_phrase(phrase: str) -> tuple[str, object] | None:
    """(key, value) of a field phrase, or None if no field's wording matches it."""
    for f in SCHEMA:
        if f.kind == "bool":
            for value in (True, False):
                if phrase in _phrases(f, value):
                    return f.key, value
            continue
        for pattern in f.phrases:
            before, _, after = pattern.partition("{}")
            value = phrase[len(before):len(phrase) - len(after)]
            if phrase.startswith(before) and phrase.endswith(after) and value:
                if f.kind == "int" and value.isdigit():
                    return f.key, int(value)
                if f.kind == "str" and value.isalpha():
                    return f.key, value
    return None


def parse_text(text: str) -> dict:
    """The record a text describes (the inverse of `generate`); ValueError on a phrase it does not know."""
    record = {f.key: None for f in SCHEMA}
    for phrase in text.split(", "):
        found = _read_phrase(phrase)
        if found is not None:
            record[found[0]] = found[1]
        elif not any(phrase.startswith(d.format("")) and phrase[len(d.format("")):].isdigit() for d in DISTRACTORS):
            raise ValueError(f"record text: unknown phrase {phrase!r}")
    return record


def to_surface(record: dict) -> str:
    """The answer as the model writes it: `(#key#:value...)`, each value left-aligned in its slot."""
    parts = [f"#{f.key}#:" + json.dumps(record[f.key]).translate(FROM_JSON).ljust(f.width) for f in SCHEMA]
    return "(" + ",".join(parts) + ")"


def to_json(text: str) -> str:
    """Surface form -> JSON text: `(` -> `{`, `)` -> `}`, `#` -> `"`."""
    return text.translate(TO_JSON)


def _no_duplicates(pairs):
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError("duplicate key")
    return dict(pairs)


def _bad_constant(name):
    raise ValueError(f"{name} is not JSON")


def _type_ok(field: Field, value) -> bool:
    if value is None:
        return field.nullable
    if field.kind == "bool":
        return isinstance(value, bool)
    if field.kind == "str":
        return isinstance(value, str) and value.isalpha() and value.islower()
    return isinstance(value, int) and not isinstance(value, bool) and field.lo <= value <= field.hi


def _slot_values(record: dict, text: str) -> list[bool]:
    """Per field: does the text after its `#key#:` (up to the next `,` or `)`, spaces stripped) read exactly as the
    value's JSON? Partial credit for an answer that is not valid JSON as a whole."""
    right = []
    for f in SCHEMA:
        m = re.search(rf"#{f.key}#:([^,)]*)", text)
        right.append(m is not None and m.group(1).strip() == json.dumps(record[f.key]).translate(FROM_JSON))
    return right


def verify(record: dict, output: str) -> dict[str, float]:
    """`parse_fail` (not a JSON object after `to_json`), `cell_acc` (share of fields with the right value and type;
    when the text is not valid JSON, share of `#key#:` slots that read exactly as the right value), `solved`
    (valid JSON, exactly the schema's keys, types valid, every value right)."""
    try:
        obj = json.loads(to_json(output.strip()), object_pairs_hook=_no_duplicates, parse_constant=_bad_constant)
    except ValueError:
        obj = None
    if not isinstance(obj, dict):
        return {"solved": 0.0, "cell_acc": sum(_slot_values(record, output)) / len(SCHEMA), "parse_fail": 1.0}
    right = [f.key in obj and type(obj[f.key]) is type(record[f.key]) and obj[f.key] == record[f.key] for f in SCHEMA]
    schema_ok = set(obj) == {f.key for f in SCHEMA} and all(_type_ok(f, obj[f.key]) for f in SCHEMA)
    return {"solved": float(schema_ok and all(right)), "cell_acc": sum(right) / len(SCHEMA), "parse_fail": 0.0}


def _layout() -> list[str | None]:
    """The answer layout: one character per canvas position, None in the value slots."""
    out = []
    for i, f in enumerate(SCHEMA):
        out += list(("(" if i == 0 else ",") + f"#{f.key}#:") + [None] * f.width
    return out + [")"]


TEMPLATE = _layout()


class JsonRecordTask(StructuredTask):
    """Schema-constrained JSON records with difficulty levels (`levels`: bucket name -> RecordLevel fields);
    `use_template` puts keys and punctuation in the canvas."""

    name = "json_record"

    def __init__(self, levels: dict | None = None, canvas_length: int | None = None, use_template: bool = False):
        self.levels = levels_from(levels, RecordLevel, DEFAULT_LEVELS)
        self.use_template = use_template
        self.canvas_length = canvas_length or len(TEMPLATE) + 1  # + EOS

    def build_split(self, split: str, n: int, seed: int) -> list[dict]:
        """`n` rows spread evenly over the levels; each text is parsed back and must give its record."""
        rng = random.Random(split_seed(split, seed))
        rows = []
        for bucket, k in split_counts(n, list(self.levels)).items():
            for _ in range(k):
                text, record = generate(self.levels[bucket], rng)
                if parse_text(text) != record or verify(record, to_surface(record))["solved"] != 1.0:
                    raise AssertionError(f"generated record {record} does not match its text {text!r}")
                rows.append(self._row(text, record, bucket))
        return rows

    def _row(self, text: str, record: dict, bucket: str) -> dict:
        return make_row(self.name, PREFIX + text, to_surface(record), bucket, text, json.dumps(record))

    def row_from_prompt(self, prompt: str) -> dict:
        """The row of a prompt `record:<phrases>` (its record read from the phrases)."""
        if not prompt.startswith(PREFIX):
            raise ValueError(f"prompt {prompt[:30]!r} must start with {PREFIX!r}")
        text = prompt[len(PREFIX):].strip()
        return self._row(text, parse_text(text), "")

    def canvas_template(self, row: dict) -> list[str | None]:
        """Keys and punctuation of `to_surface` (the same for every row); None = a value slot."""
        return TEMPLATE

    def grade(self, row: dict, output: str) -> dict[str, float]:
        """The rules (`verify`) and `exact` = the reference text itself."""
        out = verify(json.loads(row["solution"]), output)
        out["exact"] = float(output.strip() == row["response"].strip())
        return out


@register_task("json_record")
def build_record(cfg) -> JsonRecordTask:
    """`task=json_record`: levels (buckets), canvas length, canvas template."""
    return JsonRecordTask(*structured_args(cfg))
