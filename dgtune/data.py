"""Task rows -> cached `datasets` splits -> token tensors for training and sampling."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import torch

SPLITS = ("train", "val", "test")


def build_splits(task, sizes: dict[str, int], seed: int, cache_dir: str | Path | None, key: dict) -> dict[str, list[dict]]:
    """Build train/val/test rows with `datasets`, cached under `cache_dir/<task>-<hash of key>/`."""
    import datasets

    digest = hashlib.sha256(json.dumps({**key, "sizes": sizes, "seed": seed}, sort_keys=True).encode()).hexdigest()[:12]
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


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """Token ids of the chat-formatted prompt, ending with the opened model turn."""
    out = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)


def encode_rows(tokenizer, rows: list[dict], canvas_length: int) -> list[dict]:
    """Tokenise rows once: prompt ids, response ids (+EOS) and the clean canvas (EOS-filled)."""
    eos = tokenizer.eos_token_id
    out = []
    for i, row in enumerate(rows):
        p = prompt_ids(tokenizer, row["prompt"])
        r = tokenizer(row["response"], add_special_tokens=False)["input_ids"] + [eos]
        if len(r) > canvas_length:
            raise ValueError(
                f"row {i} ({row['task']}): response has {len(r)} tokens with EOS, more than canvas_length={canvas_length}"
            )
        out.append({"prompt": p, "response": r, "canvas": r + [eos] * (canvas_length - len(r))})
    return out


def collate_train(items: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids/attention_mask [b, s], prompt_len [b], canvas [b, l]."""
    seqs = [it["prompt"] + it["response"] for it in items]
    s = max(len(x) for x in seqs)
    input_ids = torch.full((len(items), s), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(items), s), dtype=torch.long)
    for i, x in enumerate(seqs):
        input_ids[i, : len(x)] = torch.tensor(x)
        attention_mask[i, : len(x)] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "prompt_len": torch.tensor([len(it["prompt"]) for it in items]),
        "canvas": torch.tensor([it["canvas"] for it in items]),
    }


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Indices of the examples of optimiser micro-batch `step`: a fresh permutation per epoch, a pure function
    of (seed, step), so a resumed run sees exactly the batches the killed one would have."""
    per_epoch = max(n // batch_size, 1)
    epoch, k = divmod(step, per_epoch)
    g = torch.Generator().manual_seed(seed * 7_919 + epoch)
    perm = torch.randperm(n, generator=g)
    return perm[k * batch_size : (k + 1) * batch_size].tolist()
