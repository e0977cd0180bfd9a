"""A Hugging Face ``Trainer`` whose loss is the FuseChat loss, logging both of its terms."""

from __future__ import annotations

from collections import defaultdict

import torch
from transformers import Trainer

from fusechat.train.loss import fusion_loss


class FusionTrainer(Trainer):
    """``Trainer`` with λ·CE(gold) + (1 − λ)·CE(fused): everything else (accumulation, schedules,
    mixed precision, checkpoints, DDP / FSDP / DeepSpeed) is the Trainer's own."""

    def __init__(self, *args, lam: float, lam_end: float | None = None, fusion_kind: str = "ce",
                 temperature: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.lam_start = lam
        self.lam_end = lam if lam_end is None else lam_end
        self.fusion_kind = fusion_kind
        self.temperature = temperature
        self._metrics: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}

    def current_lambda(self) -> float:
        """λ, moving linearly from its start to its end value over the optimizer steps."""
        if self.lam_end == self.lam_start or not self.state.max_steps:
            return self.lam_start
        progress = min(self.state.global_step / self.state.max_steps, 1.0)
        return self.lam_start + (self.lam_end - self.lam_start) * progress

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("labels")
        fused_ids = inputs.pop("fused_ids", None)
        fused_probs = inputs.pop("fused_probs", None)
        fusion_mask = inputs.pop("fusion_mask", None)
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        lam = self.current_lambda()
        parts = fusion_loss(outputs.logits, labels, fused_ids, fused_probs, fusion_mask, lam,
                            self.fusion_kind, self.temperature)
        split = "train" if model.training else "eval"
        metrics = self._metrics[split]
        metrics["loss_gold"].append(parts.gold.item())
        if parts.fusion_positions:
            metrics["loss_fusion"].append(parts.fusion.item())
        metrics["lambda"].append(lam)
        return (parts.loss, outputs) if return_outputs else parts.loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        with torch.no_grad():
            loss = self.compute_loss(model, dict(inputs))
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        split = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        prefix = "eval_" if split == "eval" else ""
        for name, values in self._metrics[split].items():
            if values:
                logs[f"{prefix}{name}"] = round(sum(values) / len(values), 6)
        self._metrics[split].clear()
        super().log(logs, start_time)
