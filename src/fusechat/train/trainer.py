"""A Hugging Face ``Trainer`` whose loss is the FuseChat loss, logging both of its terms."""

from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager

import torch
from transformers import Trainer

from fusechat.train.chunked_loss import chunked_fusion_loss
from fusechat.train.loss import LossParts, fusion_loss

# Causal LMs whose logits are their lm-head's output on the last hidden states, soft-capped at most
# (``final_logit_softcapping``): the chunked loss stands in for the head on these. Each is checked
# against the plain loss in the tests.
AUTO_MIN_VOCAB = 32_768  # chunked_loss "auto": the vocabulary from which the logits dominate a step's memory
CHUNKED_MODEL_TYPES = frozenset({"llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text",
                                 "gpt2", "phi3"})


def chunkable_head(model) -> tuple[torch.nn.Linear, float | None] | None:
    """The lm-head of ``model`` (unwrapped from DDP; a peft model's base) and its logit soft-cap, when the
    chunked loss can compute the logits in its place: a plain ``nn.Linear`` head of a known architecture
    from transformers itself."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    if getattr(config, "model_type", None) not in CHUNKED_MODEL_TYPES or not hasattr(base, "get_output_embeddings"):
        return None
    if not type(base).__module__.startswith("transformers."):  # remote code may do anything with its logits
        return None
    head = base.get_output_embeddings()
    if type(head) is not torch.nn.Linear:  # LoRA-wrapped, quantised and other heads keep the plain path
        return None
    return head, getattr(config, "final_logit_softcapping", None)


class FusionTrainer(Trainer):
    """``Trainer`` with λ·CE(gold) + (1 − λ)·CE(fused): everything else (accumulation, schedules,
    mixed precision, checkpoints, DDP / FSDP / DeepSpeed) is the Trainer's own."""

    def __init__(self, *args, lambda_: float, lambda_end: float | None = None, fusion_kind: str = "ce",
                 temperature: float = 1.0, chunked_loss: bool | str = "auto", loss_chunk_size: int | None = None,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.chunked_loss = chunked_loss
        self.loss_chunk_size = loss_chunk_size
        self.lambda_ = lambda_
        self.lambda_end = lambda_ if lambda_end is None else lambda_end
        self.fusion_kind = fusion_kind
        self.temperature = temperature
        self._metrics: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}

    def current_lambda(self) -> float:
        """λ, moving linearly from its start to its end value over the optimizer steps."""
        if self.lambda_end == self.lambda_ or not self.state.max_steps:
            return self.lambda_
        progress = min(self.state.global_step / self.state.max_steps, 1.0)
        return self.lambda_ + (self.lambda_end - self.lambda_) * progress

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("labels")
        fused_ids = inputs.pop("fused_ids", None)
        fused_probs = inputs.pop("fused_probs", None)
        fusion_mask = inputs.pop("fusion_mask", None)
        lambda_ = self.current_lambda()
        target = self._chunked_target(model)
        parts = None
        if target is None:
            outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        else:
            head, softcap = target

            def loss_from_hidden(hidden: torch.Tensor) -> LossParts:
                return chunked_fusion_loss(hidden, head.weight, head.bias, labels, fused_ids, fused_probs,
                                           fusion_mask, lambda_, self.fusion_kind, self.temperature,
                                           self.loss_chunk_size, softcap)

            with head_computes_loss(head, loss_from_hidden, labels.shape) as box:
                outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
            parts = box.get("parts")
        if parts is None:
            parts = fusion_loss(outputs.logits, labels, fused_ids, fused_probs, fusion_mask, lambda_,
                                self.fusion_kind, self.temperature)
        split = "train" if model.training else "eval"
        metrics = self._metrics[split]
        metrics["loss_gold"].append(parts.gold.item())
        if parts.fusion_positions:
            metrics["loss_fusion"].append(parts.fusion.item())
        metrics["lambda"].append(lambda_)
        return (parts.loss, outputs) if return_outputs else parts.loss

    def _chunked_target(self, model) -> tuple[torch.nn.Linear, float | None] | None:
        """The head the chunked loss replaces for this step, or None for the plain path: switched off, or
        under FSDP / DeepSpeed (whose head weight may be a shard), or a head it cannot stand in for."""
        if self.chunked_loss is False or self.is_fsdp_enabled or self.is_deepspeed_enabled:
            return None
        target = chunkable_head(self.accelerator.unwrap_model(model))
        if target is not None and self.chunked_loss == "auto" and target[0].weight.shape[0] < AUTO_MIN_VOCAB:
            return None  # the logits of a small vocabulary cost little: the plain path keeps results bit-exact
        return target

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


@contextmanager
def head_computes_loss(head: torch.nn.Linear, loss_from_hidden, positions: torch.Size):
    """Within the block, ``head`` called on (B, T, H) hidden states with (B, T) == ``positions`` returns
    ``loss_from_hidden(hidden).loss`` as (1, 1, 1) "logits" and leaves the ``LossParts`` in the yielded dict
    under ``parts``; any other call (another shape or device) is the head's own.

    The model is still called through its wrappers, so DDP sees a forward whose output depends on every
    parameter, the head included; the caller takes the loss from the dict, not from the logits, which
    the model may still transform (soft-capping, which the chunked loss applies itself).
    """
    box: dict[str, LossParts] = {}
    own = head.__dict__.get("forward")  # an instance-level forward (accelerate hooks) stays in place

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        if hidden.dim() != 3 or hidden.shape[:2] != positions or hidden.device != head.weight.device:
            return own(hidden) if own is not None else type(head).forward(head, hidden)
        box["parts"] = parts = loss_from_hidden(hidden)
        return parts.loss.view(1, 1, 1)

    head.forward = forward
    try:
        yield box
    finally:
        if own is None:
            del head.forward
        else:
            head.forward = own
