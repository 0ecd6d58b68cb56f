"""The package's shape (issue 23): no import circle inside `dgtune/` (counting imports inside functions too), no
library code reached through a command's `__main__`, and tasks found by name through the registry."""

import ast
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def module_name(path: Path) -> str:
    name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    return name.removesuffix(".__init__")


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The dgtune modules `path` imports anywhere in its body (a `from a.b import c` counts `a.b.c` when that is a
    module, else `a.b`)."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(parts + ([base] if base else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != me:
                found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    files = list((ROOT / "dgtune").rglob("*.py"))
    modules = {module_name(p) for p in files}
    return {module_name(p): imports_of(p, modules) for p in files}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_checker_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle_inside_dgtune():
    graph = import_graph()
    assert "dgtune.sampling.sampler" in graph and graph["dgtune.train"]  # the walk sees the package
    assert cycles(graph) == []


def test_no_code_imports_a_commands_main():
    """`__main__` modules are thin command-line wrappers: library code and scripts import the library modules."""
    offenders = []
    for path in [*(ROOT / "dgtune").rglob("*.py"), *(ROOT / "eval").rglob("*.py")]:
        if path.name == "__main__.py":
            continue
        text = path.read_text()
        if ".__main__ import" in text or "__main__ as " in text:
            offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []


def test_tasks_are_found_by_name_and_unknown_names_are_listed():
    from omegaconf import OmegaConf

    from dgtune.errors import ConfigError
    from dgtune.tasks import TASKS, build_task

    task = build_task(OmegaConf.create({"name": "countdown"}))
    assert task.name == "countdown"
    with pytest.raises(ConfigError, match=r"unknown task.name='nosuch' \(known: .*countdown"):
        build_task(OmegaConf.create({"name": "nosuch"}))
    # an unknown name imports every task module first (a known one may be found before the others are imported)
    assert {"sudoku", "countdown", "json_record", "coloring", "data", "mixture"} <= set(TASKS)
    with pytest.raises(ConfigError, match=r"task.module='no_such_module'"):
        build_task(OmegaConf.create({"name": "mine", "module": "no_such_module"}))


def test_model_family_is_read_from_the_model_and_names_what_it_knows(tiny):
    import copy

    from omegaconf import OmegaConf

    from dgtune.errors import InputError
    from dgtune.models.families.diffusion_gemma import DIFFUSION_GEMMA
    from dgtune.models.family import family_of
    from dgtune.train import apply_lora

    model, _ = tiny
    assert family_of(model) is DIFFUSION_GEMMA and family_of(model.config) is DIFFUSION_GEMMA
    cfg = OmegaConf.create({"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": None, "target_parameters": []})
    wrapped = apply_lora(copy.deepcopy(model), cfg)  # lora.target_modules=null: the family's pattern
    assert family_of(wrapped) is DIFFUSION_GEMMA
    explicit = apply_lora(copy.deepcopy(model), OmegaConf.merge(cfg, {"target_modules": DIFFUSION_GEMMA.lora_target_modules}))
    names = lambda m: sorted(n for n, p in m.named_parameters() if p.requires_grad)  # noqa: E731
    assert names(wrapped) == names(explicit) and names(wrapped)
    other = OmegaConf.create({"architectures": ["MMadaModelLM"], "model_type": "mmada"})  # no profile
    with pytest.raises(InputError, match=r"MMadaModelLM.*'mmada'.*known: ") as err:
        family_of(other)
    assert all(f in str(err.value) for f in ("diffusion_gemma", "llada", "dream", "llada2", "sdar"))
    llada2 = OmegaConf.create({"architectures": ["LLaDA2MoeModelLM"], "model_type": "llada2_moe"})  # LLaDA2.0-mini
    assert family_of(llada2).name == "llada2"
    sdar = OmegaConf.create({"architectures": ["SDARForCausalLM"], "model_type": "sdar"})  # SDAR-8B-Chat's config
    assert family_of(sdar).name == "sdar"
    llada = OmegaConf.create({"architectures": ["LLaDAModelLM"], "model_type": "llada"})  # LLaDA-8B's config
    assert family_of(llada).name == "llada"
    dream = OmegaConf.create({"architectures": ["DreamModel"], "model_type": "Dream"})  # Dream-v0's config
    assert family_of(dream).name == "dream"


def test_docs_recipe_lines_compose():
    """Every command line of docs/recipes.md (the retired recipes as overrides) composes, and the curated recipe
    files carry no provenance (run folders, measured figures) in their headers."""
    import shlex

    from dgtune.config import compose, recipes_dir

    text = (Path(__file__).parents[1] / "docs" / "recipes.md").read_text()
    lines = [ln for ln in text.splitlines() if ln.startswith("python -m dgtune.train ")]
    assert len(lines) == 7
    for line in lines:
        cfg = compose(shlex.split(line)[3:])
        assert cfg.run_name == shlex.split(line)[-1].split("=")[1]
    for path in recipes_dir().glob("*.yaml"):
        header = "\n".join(ln for ln in path.read_text().splitlines() if ln.startswith("#"))
        assert "runs/" not in header and "Measured" not in header, path.name


def test_model_calls_run_the_model_familys_module(tiny, monkeypatch):
    """The front door (`dgtune.diffusion.model_calls`) runs the calls module of the model's family, so a second family
    is one module: here a family "other" whose module counts each call and answers with DiffusionGemma's; the fast
    sampler then runs through it (no fused decoder for that family: transformers' decoder path) and draws what it
    draws for DiffusionGemma on that path."""
    import copy
    import sys
    import types

    from dgtune.diffusion import model_calls
    from dgtune.models import family as fam
    from dgtune.models.families import diffusion_gemma as dg
    from dgtune.sampling.config import SamplerConfig
    from dgtune.sampling.sampler import sample

    model, tok = tiny
    counts = {}
    module = types.ModuleType("other_family_calls")
    for name in ("encode", "decode_hidden", "lm_logits", "embedding_dtype", "vocab_size"):
        def call(*args, _name=name, **kw):
            counts[_name] = counts.get(_name, 0) + 1
            return getattr(dg, _name)(*args, **kw)
        setattr(module, name, call)
    monkeypatch.setitem(sys.modules, "other_family_calls", module)
    monkeypatch.setitem(fam.FAMILIES, "other", fam.ModelFamily(
        name="other", architectures=("OtherLM",), model_types=("other",), model_class="OtherLM",
        lora_target_modules="x", calls="other_family_calls"))
    other_cls = type("OtherLM", (type(model),), {})
    other = copy.copy(model)
    other.__class__ = other_cls
    other.config = copy.deepcopy(model.config)
    other.config.architectures = ["OtherLM"]
    assert fam.family_of(other).name == "other" and model_calls.family_calls(other) is module
    prompts = torch.randint(7, 40, (2, 10), generator=torch.Generator().manual_seed(0))
    cfg = SamplerConfig(max_steps=4)  # decoder=auto: fused for DiffusionGemma, not for "other"
    ours = sample(other, prompts, cfg, torch.Generator().manual_seed(1), tok.eos_token_id, tok.pad_token_id)
    ref = sample(model, prompts, SamplerConfig(max_steps=4, decoder="transformers"), torch.Generator().manual_seed(1),
                 tok.eos_token_id, tok.pad_token_id)
    assert torch.equal(ours.tokens, ref.tokens) and torch.equal(ours.nfe, ref.nfe)
    assert counts["encode"] == 1 and counts["decode_hidden"] == counts["lm_logits"] >= 1 and counts["vocab_size"] == 1
    with pytest.raises(Exception, match="no fused decoder for model family other"):
        sample(other, prompts, SamplerConfig(max_steps=4, decoder="fused"), torch.Generator().manual_seed(1),
               tok.eos_token_id, tok.pad_token_id)


def test_a_new_task_is_one_file_and_one_yaml(tmp_path, monkeypatch):
    """The walkthrough of docs/extending.md: its task file (from a temporary folder, named by `task.module`) and its
    YAML, and nothing else, train two steps and evaluate."""
    import re

    from omegaconf import OmegaConf

    from dgtune.config import compose
    from dgtune.train import train

    doc = (ROOT / "docs" / "extending.md").read_text()
    code, yaml = re.findall(r"```python\n(.*?)```", doc, re.S)[0], re.findall(r"```yaml\n(.*?)```", doc, re.S)[0]
    (tmp_path / "sort_letters_doc.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    task_cfg = {**OmegaConf.to_container(OmegaConf.create(yaml)), "module": "sort_letters_doc", "n_train": 16,
                "n_val": 2, "n_test": 4}
    cfg = compose(["trainer.max_steps=2", "trainer.batch_size=4", "trainer.progress_bar=false", "eval.steps=[1]",
                   "eval.quick_every=0", "eval.compare_base=false", "logger=none", "trainer.mixed_precision=no",
                   f"run_dir={tmp_path / 'run'}", f"data_dir={tmp_path / 'data'}"])
    cfg.task = OmegaConf.create(task_cfg)
    summary = train(cfg)
    import json

    rows = json.loads(Path(summary["report"]).read_text())["rows"]
    assert {r["bucket"] for r in rows} >= {"all"} and all(r["n"] > 0 for r in rows)
