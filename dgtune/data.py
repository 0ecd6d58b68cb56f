"""Task rows -> cached `datasets` splits -> token tensors for training and sampling."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import torch

from dgtune.errors import InputError

SPLITS = ("train", "val", "test")
DATA_VERSION = 3  # bump when the rows a task builds change, to invalidate cached splits


def splits_for(task, cfg) -> dict[str, list[dict]]:
    """A run config's train/val/test rows of `task`: sizes and seed from `cfg.task`, cached under `cfg.data_dir`."""
    from omegaconf import OmegaConf

    sizes = {"train": cfg.task.n_train, "val": cfg.task.n_val, "test": cfg.task.n_test}
    key = OmegaConf.to_container(cfg.task, resolve=True)
    files = {p: v for t in [task, *getattr(task, "tasks", {}).values()] for p, v in file_fingerprint(t).items()}
    if files:  # the cached rows of a data-file task are stale once a file changes
        key["file_fingerprints"] = files
    return build_splits(task, sizes, cfg.task.seed, cfg.data_dir, key)


def file_fingerprint(task) -> dict[str, list[int]]:
    """{path: [size, mtime_ns]} of the data files a task reads (`task.files`), {} for generated tasks."""
    out = {}
    for path in (getattr(task, "files", None) or {}).values():
        if path and Path(path).exists():
            st = Path(path).stat()
            out[str(path)] = [st.st_size, st.st_mtime_ns]
    return out


def build_splits(task, sizes: dict[str, int], seed: int, cache_dir: str | Path | None, key: dict) -> dict[str, list[dict]]:
    """Build train/val/test rows with `datasets`, cached under `cache_dir/<task>-<hash of key>/`."""
    import datasets

    datasets.disable_progress_bars()
    digest = hashlib.sha256(json.dumps({**key, "sizes": sizes, "seed": seed, "version": DATA_VERSION}, sort_keys=True).encode()).hexdigest()[:12]
    path = Path(cache_dir) / f"{task.name}-{digest}" if cache_dir else None
    if path is not None and (path / "dataset_dict.json").exists():
        dd = datasets.load_from_disk(str(path))
        return {k: dd[k].to_list() for k in SPLITS}
    dd = datasets.DatasetDict({k: datasets.Dataset.from_list(task.build_split(k, sizes[k], seed)) for k in SPLITS})
    if path is not None:
        tmp = path.with_name(path.name + f".tmp{random.randrange(1 << 30)}")
        dd.save_to_disk(str(tmp))
        try:
            tmp.rename(path)
        except OSError:  # another process cached it first
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return {k: dd[k].to_list() for k in SPLITS}


def prompt_ids(tokenizer, prompt: str | list[dict]) -> list[int]:
    """Token ids of the chat-formatted prompt, ending with the opened model turn. `prompt` is the user message, or
    a list of chat messages ({"role", "content"}: system / user / assistant turns before the answer)."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)


def row_prompt(row: dict) -> str | list[dict]:
    """What the model is prompted with for a row: its chat `context` (a JSON list of the messages before the answer,
    set by chat-format data) when it has one, else its `prompt` as the one user message."""
    context = row.get("context")
    return json.loads(context) if context else row["prompt"]


def template_ids(tokenizer, template: list[str | None] | None, canvas_length: int) -> list[int]:
    """Canvas template as token ids: the id of each known piece, -1 where the model must fill in. [l]"""
    ids = [-1] * canvas_length
    known: dict[str, int] = {}  # piece -> id (a 9x9 grid repeats 9 pieces 81 times)
    for i, piece in enumerate(template or []):
        if piece is not None:
            if piece not in known:
                tok = tokenizer(piece, add_special_tokens=False)["input_ids"]
                if len(tok) != 1:
                    raise InputError(f"template piece {piece!r} at position {i} is not exactly one token")
                known[piece] = tok[0]
            ids[i] = known[piece]
    return ids


def encode_rows(tokenizer, rows: list[dict], canvas_length: int, task=None) -> list[dict]:
    """Tokenise rows once: prompt ids, response ids (+EOS), the clean canvas (EOS-filled to a whole number of
    canvases, `n_blocks` of them, at most the task's `max_canvases`, default 1) and, when the task gives canvas
    templates, the template ids (-1 = free position)."""
    eos = tokenizer.eos_token_id
    use_template = task is not None and getattr(task, "use_template", False)
    max_canvases = int(getattr(task, "max_canvases", 1) or 1)
    out, prompts = [], {}  # prompt text -> ids (a compact prompt is the same for every row)
    for i, row in enumerate(rows):
        text = row_prompt(row)
        key = text if isinstance(text, str) else json.dumps(text)
        if key not in prompts:
            prompts[key] = prompt_ids(tokenizer, text)
        p = list(prompts[key])
        r = tokenizer(row["response"], add_special_tokens=False)["input_ids"] + [eos]
        if len(r) > canvas_length * max_canvases:
            raise InputError(
                f"{row.get('source') or f'row {i}'} ({row['task']}): response has {len(r)} tokens with EOS, more than "
                f"{max_canvases} canvas(es) x canvas_length={canvas_length} (raise task.max_canvases or "
                f"task.canvas_length)")
        n_blocks = -(-len(r) // canvas_length)
        item = {"prompt": p, "response": r, "canvas": r + [eos] * (n_blocks * canvas_length - len(r)),
                "n_blocks": n_blocks}
        if use_template:
            item["template"] = template_ids(tokenizer, task.canvas_template(row), canvas_length * n_blocks)
            bad = next((j for j, (t, c) in enumerate(zip(item["template"], item["canvas"])) if 0 <= t != c), None)
            if bad is not None:
                raise InputError(f"{row.get('source') or f'row {i}'} ({row['task']}): response token {bad} is "
                                 f"{tokenizer.decode([item['canvas'][bad]])!r}, the canvas template fixes "
                                 f"{tokenizer.decode([item['template'][bad]])!r} there")
        out.append(item)
    return out


def collate_train(items: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids/attention_mask [b, s], prompt_len [b], canvas [b, l]; when some answer spans
    several canvases, canvas [b, n l] (n = the most blocks of a row, later blocks EOS) and block_count [b]."""
    n = max(it.get("n_blocks", 1) for it in items)
    if n > 1:  # every row's canvas (and template) to n blocks: EOS / free past its answer; those blocks are never picked
        l = len(items[0]["canvas"]) // items[0].get("n_blocks", 1)
        eos = items[0]["canvas"][-1]
        items = [{**it, "canvas": it["canvas"] + [eos] * (n * l - len(it["canvas"])),
                  **({"template": it["template"] + [-1] * (n * l - len(it["template"]))} if "template" in it else {})}
                 for it in items]
    seqs = [it["prompt"] + it["response"] for it in items]
    s = max(len(x) for x in seqs)
    input_ids = torch.full((len(items), s), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(items), s), dtype=torch.long)
    for i, x in enumerate(seqs):
        input_ids[i, : len(x)] = torch.tensor(x)
        attention_mask[i, : len(x)] = 1
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "prompt_len": torch.tensor([len(it["prompt"]) for it in items]),
        "canvas": torch.tensor([it["canvas"] for it in items]),
    }
    if "template" in items[0]:
        batch["canvas_keep"] = torch.tensor([it["template"] for it in items]) >= 0  # [b, l]
    if n > 1:
        batch["block_count"] = torch.tensor([it.get("n_blocks", 1) for it in items])  # [b]
    return batch


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Indices of the examples of optimiser micro-batch `step`: a fresh permutation per epoch, a pure function
    of (seed, step), so a resumed run sees exactly the batches the killed one would have."""
    per_epoch = max(n // batch_size, 1)
    epoch, k = divmod(step, per_epoch)
    g = torch.Generator().manual_seed(seed * 7_919 + epoch)
    perm = torch.randperm(n, generator=g)
    return perm[k * batch_size : (k + 1) * batch_size].tolist()
