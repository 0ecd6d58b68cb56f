"""The published 9x9 Sudoku adapter (published_adapters/sudoku9-solve-lora) stays loadable: by `python -m dgtune.eval FOLDER`
and by plain peft on the bundled base, with a portable base name and within the size limit."""

import json
from pathlib import Path

import pytest
import torch

from test_cli import ROOT, run_cli

PUBLISHED = ROOT / "published_adapters" / "sudoku9-solve-lora"


def test_published_folder_is_small_portable_and_carded():
    files = [p for p in PUBLISHED.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 10 * 2**20
    adapter_cfg = json.loads((PUBLISHED / "final" / "adapter_config.json").read_text())
    assert not adapter_cfg["base_model_name_or_path"].startswith("/")
    card = (PUBLISHED / "README.md").read_text()
    assert "python -m dgtune.train recipe=sudoku_solve" in card and "python -m dgtune.eval" in card


@pytest.mark.slow  # a subprocess run of the CLI (or torch.compile): pytest -m 'not slow' skips it
def test_dgtune_eval_on_the_published_folder_beats_the_base(tmp_path):
    out = tmp_path / "report"
    run_cli("dgtune.eval", [str(PUBLISHED), "eval.max_rows=6", "eval.steps=[12]", f"eval.out_dir={out}",
                            "eval.batch_size=6"], tmp_path)
    rows = json.loads((out / "report.json").read_text())["rows"]
    acc = {r["model"]: r["cell_acc"] for r in rows if r["bucket"] == "all" and r["task"] == "all"}
    assert acc["tuned"] > acc["base"] + 0.2, acc


def test_plain_peft_loads_the_adapter_on_the_bundled_base():
    from peft import PeftModel
    from transformers import AutoTokenizer, DiffusionGemmaForBlockDiffusion

    base_dir = ROOT / "dgtune" / "assets" / "tiny-diffusiongemma"
    base = DiffusionGemmaForBlockDiffusion.from_pretrained(str(base_dir), use_safetensors=True)
    model = PeftModel.from_pretrained(base, str(PUBLISHED / "final"))
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)
    tok = AutoTokenizer.from_pretrained(str(PUBLISHED / "final"))
    assert tok("sudoku:")["input_ids"]
    assert torch.isfinite(next(model.parameters())).all()
