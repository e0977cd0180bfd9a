"""Training examples: the prepared pivot tokens and labels, joined with the fused targets by sequence."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fusechat.shards import shard_files


class FusionDataset(torch.utils.data.Dataset):
    """Row ``i`` of a subset of prepared sequences, with its fused distributions if any.

    ``prepared``: the prepared ``datasets.Dataset``; ``fused``: a ``datasets.Dataset``
    of fused rows (memory-mapped Arrow, read from the fuse stage's Parquet shards)
    whose row ``seq`` is prepared row ``seq``, or None for plain fine-tuning.
    """

    def __init__(self, prepared, indices: list[int], fused=None):
        self.prepared = prepared
        self.indices = indices
        self.fused = fused

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        seq = self.indices[i]
        row = self.prepared[seq]
        item = {"input_ids": row["input_ids"], "labels": row["labels"]}
        if self.fused is not None:
            f = self.fused[seq]
            if f["seq"] != seq:
                raise ValueError(f"fused row {seq} holds sequence {f['seq']}: fused targets out of order")
            item["fused_ids"] = f["ids"]
            item["fused_probs"] = f["probs"]
            item["fusion_mask"] = f["in_loss"]
        return item


def load_fused(folder: Path, cache_dir: Path):
    """The fuse stage's shards as a memory-mapped dataset, ordered by sequence."""
    import datasets


    files = [str(p) for _, p in sorted(shard_files(folder).items())]
    ds = datasets.Dataset.from_parquet(files, cache_dir=str(cache_dir), keep_in_memory=False)
    return ds


@dataclass
class FusionCollator:
    """Right-pads a batch: ids with ``pad_id``, labels with −100, fused targets with zeros."""

    pad_id: int

    def __call__(self, items: list[dict]) -> dict:
        T = max(len(x["input_ids"]) for x in items)
        B = len(items)
        batch = {
            "input_ids": torch.full((B, T), self.pad_id, dtype=torch.long),
            "attention_mask": torch.zeros((B, T), dtype=torch.long),
            "labels": torch.full((B, T), -100, dtype=torch.long),
        }
        fused = "fused_ids" in items[0]
        if fused:
            k = len(items[0]["fused_ids"][0])
            batch["fused_ids"] = torch.zeros((B, T, k), dtype=torch.long)
            batch["fused_probs"] = torch.zeros((B, T, k), dtype=torch.float32)
            batch["fusion_mask"] = torch.zeros((B, T), dtype=torch.bool)
        for b, x in enumerate(items):
            n = len(x["input_ids"])
            batch["input_ids"][b, :n] = torch.as_tensor(x["input_ids"])
            batch["attention_mask"][b, :n] = 1
            batch["labels"][b, :n] = torch.as_tensor(x["labels"])
            if fused:
                batch["fused_ids"][b, :n] = torch.as_tensor(np.asarray(x["fused_ids"], dtype=np.int64))
                batch["fused_probs"][b, :n] = torch.as_tensor(np.asarray(x["fused_probs"], dtype=np.float32))
                batch["fusion_mask"][b, :n] = torch.as_tensor(np.asarray(x["fusion_mask"], dtype=bool))
        return batch
