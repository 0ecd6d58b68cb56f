"""Bring your own data (`task=data`): chat files whose loss covers the last assistant turn only, renamed columns in
Parquet / CSV / JSON files, verifiers, canvas template strings, and one-line errors."""

import json
import subprocess
import sys

import pytest
import torch

from dgtune.config import compose
from dgtune.data import collate_train, encode_rows, prompt_ids, row_prompt
from dgtune.tasks import build_task
from dgtune.tasks.data import DataTask

pytestmark = pytest.mark.trains  # trains with trainer.mixed_precision=auto: .ci/run reruns it under auto's other outcome

CHATS = [
    [{"role": "system", "content": "be brief"}, {"role": "user", "content": "add:1+2"},
     {"role": "assistant", "content": "3"}, {"role": "user", "content": "add:30+4"},
     {"role": "assistant", "content": "34"}],
    [{"role": "user", "content": "rev:123"}, {"role": "assistant", "content": "321"},
     {"role": "user", "content": "sort:9182"}, {"role": "assistant", "content": "1289"},
     {"role": "user", "content": "rev:55"}, {"role": "assistant", "content": "55"}],
]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_chat_rows_put_earlier_turns_in_the_prompt_and_only_the_last_answer_in_the_canvas(tiny, tmp_path):
    _, tok = tiny
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": m, "id": i} for i, m in enumerate(CHATS)])
    task = DataTask("chat", {"train": path}, 24, {"messages": "messages"})
    rows = task.build_split("train", 0, 0)
    items = encode_rows(tok, rows, 24, task)
    for msgs, row, it in zip(CHATS, rows, items):
        last = msgs[-1]["content"]
        assert row["response"] == last and row["prompt"] == msgs[-2]["content"]
        # the canvas (all the diffusion loss sees) is exactly the last assistant turn + EOS, EOS-filled
        n = len(last)
        assert tok.decode(it["canvas"][:n]) == last and set(it["canvas"][n:]) == {tok.eos_token_id}
        # the prompt holds every earlier turn (earlier answers included), through the chat template
        assert it["prompt"] == prompt_ids(tok, msgs[:-1])
        for m in msgs[1:-1]:
            assert m["content"] in tok.decode(it["prompt"])
        assert last not in tok.decode(it["prompt"]).split("<|model|>")[-1]
        # prompt + canvas answer = the whole conversation as the chat template writes it
        full = tok.apply_chat_template(msgs, tokenize=True)
        full = list(full["input_ids"] if hasattr(full, "keys") else full)
        assert it["prompt"] + it["response"] == full
    assert row_prompt(rows[0]) == CHATS[0][:-1]


def test_training_two_steps_on_a_chat_file(tmp_path, monkeypatch):
    """train() on a several-turn chat file: the loss's canvas targets are the last assistant turns only."""
    import dgtune.diffusion.loss as loss_mod
    from dgtune.train import train

    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": m} for m in CHATS * 4])
    seen = []
    real = loss_mod.denoising_loss

    def recording(model, batch, *args, **kwargs):
        seen.append(batch["canvas"].clone())
        return real(model, batch, *args, **kwargs)

    monkeypatch.setattr(loss_mod, "denoising_loss", recording)
    cfg = compose(["task=data", f"task.files.train={path}", "task.columns.messages=messages", "task.canvas_length=8",
                   "task.n_val=2", "trainer.max_steps=2", "trainer.batch_size=4", "trainer.log_every=1",
                   "trainer.progress_bar=false", "trainer.mixed_precision=no", "eval.at_end=false",
                   "eval.quick_every=0", f"run_dir={tmp_path / 'run'}", f"data_dir={tmp_path / 'data'}"])
    summary = train(cfg)
    assert summary["steps"] == 2 and summary["loss"] == summary["loss"]  # finite (not NaN)
    from dgtune.models.load import load_model

    _, tok = load_model(cfg.model)
    answers = {m[-1]["content"] for m in CHATS}
    assert len(seen) == 2
    for canvas in seen:
        for row in canvas:
            assert tok.decode(row, skip_special_tokens=True) in answers
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert sum("train/loss" in m for m in metrics) == 2


def test_column_mapping_formats_buckets_template_and_verifier(tiny, tmp_path):
    import pandas as pd

    _, tok = tiny
    df = pd.DataFrame({"question": ["x=1,y=2", "x=7,y=5"], "answer": ["a=3;b=2", "a=12;b=35"], "level": [1, 2]})
    for ext, write in ((".parquet", df.to_parquet), (".csv", lambda p: df.to_csv(p, index=False)),
                       (".json", lambda p: df.to_json(p, orient="records", lines=True))):
        path = str(tmp_path / f"t{ext}")
        write(path)
        task = DataTask("m", {"test": path}, 10, {"prompt": "question", "response": "answer", "bucket": "level"},
                        verifier="json:loads")
        rows = task.build_split("test", 0, 0)
        assert [(r["prompt"], r["response"], r["bucket"]) for r in rows] == [
            ("x=1,y=2", "a=3;b=2", "1"), ("x=7,y=5", "a=12;b=35", "2")], ext
    task = DataTask("m", {"test": path}, 10, {"prompt": "question", "response": "answer"}, template="a=_;b=_")
    with pytest.raises(ValueError, match=r"t.json row 2 \(m\): response token 3 is '2'.*fixes ';'"):
        encode_rows(tok, task.build_split("test", 0, 0), 10, task)
    items = encode_rows(tok, task.build_split("test", 1, 0), 10, task)
    assert [t >= 0 for t in items[0]["template"]] == [True, True, False, True, True, True, False] + [False] * 3
    assert collate_train(items, 0)["canvas_keep"].sum() == 5
    assert task.template_tensor(tok, rows).shape == (2, 10)


def test_clear_errors(tiny, tmp_path):
    _, tok = tiny
    path = write_jsonl(tmp_path / "t.jsonl", [{"q": "a", "a": "1"}])
    with pytest.raises(ValueError, match=r"t.jsonl has no column 'question' \(task.columns.prompt\); its columns: \['q', 'a'\]"):
        DataTask("m", {"train": path}, 8, {"prompt": "question", "response": "a"}).build_split("train", 0, 0)
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ValueError, match="empty.csv is empty"):
        DataTask("m", {"train": str(tmp_path / "empty.csv")}, 8).build_split("train", 0, 0)
    (tmp_path / "header.csv").write_text("prompt,response\n")
    with pytest.raises(ValueError, match="header.csv has no rows"):
        DataTask("m", {"train": str(tmp_path / "header.csv")}, 8).build_split("train", 0, 0)
    with pytest.raises(FileNotFoundError, match="nope.parquet does not exist"):
        DataTask("m", {"train": str(tmp_path / "nope.parquet")}, 8).build_split("train", 0, 0)
    long = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "p", "response": "1" * 5}, {"prompt": "p", "response": "1" * 16}])
    task = DataTask("m", {"train": long}, 8, max_canvases=2)
    with pytest.raises(ValueError, match=r"long.jsonl row 2 \(m\): response has 17 tokens with EOS, more than 2 canvas"):
        encode_rows(tok, task.build_split("train", 0, 0), 8, task)
    bad_chat = write_jsonl(tmp_path / "c.jsonl", [{"messages": CHATS[0]}, {"messages": CHATS[1][:-1]}])
    with pytest.raises(ValueError, match=r"c.jsonl: row 2: the last message must be the assistant's answer, got role 'user'"):
        DataTask("m", {"train": bad_chat}, 8, {"messages": "messages"}).build_split("train", 0, 0)
    with pytest.raises(ValueError, match="cannot import module 'no_such_pkg.mod'"):
        DataTask("m", {}, 8, verifier="no_such_pkg.mod:f")
    with pytest.raises(ValueError, match="has no function 'nope'"):
        DataTask("m", {}, 8, verifier="json:nope")
    with pytest.raises(ValueError, match="more than task.canvas_length=4"):
        DataTask("m", {}, 4, template="a=__;")
    with pytest.raises(ValueError, match=r"task.columns has unknown keys \['answer'\]"):
        build_task(compose(["task=data", "+task.columns.answer=x"]).task)


@pytest.mark.slow  # a subprocess run of the CLI (or torch.compile): pytest -m 'not slow' skips it
def test_train_cli_from_parquet_with_renamed_columns_and_long_answers(tmp_path):
    """`python -m dgtune.train task=data` from a Parquet file with columns of its own, answers of 2-3 canvases
    (canvas 8), a verifier given as module:function and a bucket column; then `python -m dgtune.eval RUN_DIR`."""
    import pandas as pd

    from test_cli import SMALL, run_cli

    g = torch.Generator().manual_seed(0)
    recs = []
    for i in range(24):
        k = int(torch.randint(11, 19, (1,), generator=g))
        digits = "".join(str(int(d)) for d in torch.randint(0, 10, (k,), generator=g))
        recs.append({"question": f"rev:{digits}", "reply": digits[::-1], "size": "long" if k > 14 else "short"})
    pd.DataFrame(recs).to_parquet(tmp_path / "rev.parquet")
    (tmp_path / "myverify.py").write_text("def check(row, output):\n    return output == row['response']\n")
    args = ["task=data", "task.task_name=rev", "task.files.train=rev.parquet", "task.files.test=rev.parquet",
            "task.columns.prompt=question", "task.columns.response=reply", "task.columns.bucket=size",
            "task.verifier=myverify:check", "task.canvas_length=8", "task.max_canvases=3", "trainer.max_steps=2",
            "eval.steps=[2]", "eval.quick_every=0", "run_dir=run", *SMALL[:1], "trainer.progress_bar=false",
            "task.n_val=4", "task.n_test=6", "sampler.max_steps=2"]
    run_cli("dgtune.train", args, tmp_path)
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert {r["bucket"] for r in report["rows"]} == {"all", "long", "short"}
    assert {r["model"] for r in report["rows"]} == {"base", "tuned"} and report["meta"]["task"] == "rev"
    run_cli("dgtune.eval", ["run", "eval.steps=[1]", "eval.compare_base=false"], tmp_path)
    (eval_dir,) = (tmp_path / "run").glob("eval-*")  # eval writes its own folder; the training report stays
    assert {r["steps"] for r in json.loads((eval_dir / "report.json").read_text())["rows"]} == {1}
    assert {r["steps"] for r in json.loads((tmp_path / "run" / "report.json").read_text())["rows"]} == {2}


def test_mixture_recipe_trains_one_adapter_and_reports_each_task(tmp_path):
    """recipe=mixture (4x4 Sudoku + reversal answers of 1-2 canvases), shrunk: one run, a report with rows for all
    tasks together and for each task, and 2-canvas sampling in its eval."""
    from dgtune.train import train

    cfg = compose(["recipe=mixture", "trainer.max_steps=2", "trainer.batch_size=8", "task.n_train=16", "task.n_val=4",
                   "task.n_test=8", "eval.steps=[1]", "eval.compare_base=false", "eval.quick_every=0",
                   "trainer.progress_bar=false", "trainer.mixed_precision=no", f"run_dir={tmp_path / 'run'}",
                   f"data_dir={tmp_path / 'data'}"])
    train(cfg)
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    by = {r["task"]: r for r in report["rows"] if r["bucket"] == "all"}
    assert set(by) == {"all", "sudoku4", "rev"} and by["all"]["n"] == 8 and by["sudoku4"]["n"] + by["rev"]["n"] == 8
    assert "## Task: rev" in (tmp_path / "run" / "report.md").read_text()
