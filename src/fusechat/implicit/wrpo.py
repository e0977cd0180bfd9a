"""Preference training of the implicit route: TRL's DPOTrainer for DPO, a subclass of it for WRPO.

DPO (``implicit.dpo.loss``: ``sigmoid``, or ``sigmoid_norm`` on length-normalised
log-ratios) is TRL's own loss. WRPO (Yang et al., "Weighted-Reward Preference
Optimization for Implicit Model Fusion") rewards two chosen answers, the source's
``y_ws`` and the target's own best ``y_wt``, against the target's worst ``y_l``:

    −log σ( β [ α·log π/π_ref(y_ws) + (1 − α)·log π/π_ref(y_wt) − log π/π_ref(y_l) ] )

with α rising linearly from 0 to ``wrpo_alpha`` over the first ``wrpo_ramp`` of the
steps, so the target first learns from answers of its own distribution. The
subclass changes the loss and what the loss needs (the third answer tokenized and
batched); the rest (reference model, optimiser, schedule, checkpoints, logging)
is DPOTrainer's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from trl import DPOTrainer
from trl.trainer.dpo_trainer import DataCollatorForPreference

TARGET_CHOSEN = "target_chosen"


def sequence_logps(logits: torch.Tensor, input_ids: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """Σ log p(token t | tokens < t) over the completion tokens of each row: ``(B,)``."""
    logp = logits[:, :-1].float().log_softmax(-1)
    token_logp = logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return (token_logp * completion_mask[:, 1:]).sum(dim=1)


def wrpo_loss(source_chosen: torch.Tensor, target_chosen: torch.Tensor, rejected: torch.Tensor,
              ref_source_chosen: torch.Tensor, ref_target_chosen: torch.Tensor, ref_rejected: torch.Tensor,
              alpha: float, beta: float) -> torch.Tensor:
    """Per-pair WRPO loss from summed log-probabilities under the policy and the reference."""
    chosen = alpha * (source_chosen - ref_source_chosen) + (1 - alpha) * (target_chosen - ref_target_chosen)
    return -F.logsigmoid(beta * (chosen - (rejected - ref_rejected)))


def wrpo_alpha(final: float, ramp: float, step: int, max_steps: int) -> float:
    """α at ``step``: linear from 0 to ``final`` over the first ``ramp`` share of ``max_steps``, then ``final``."""
    if max_steps <= 0:
        return final
    return final * min(1.0, step / max(ramp * max_steps, 1e-9))


@dataclass
class WRPOCollator(DataCollatorForPreference):
    """Right-padded ``[source chosen; target chosen; rejected]`` rows with their completion masks."""

    def torch_call(self, examples: list[dict]) -> dict:
        parts = [("prompt_ids", "chosen_ids"), ("target_prompt_ids", "target_chosen_ids"),
                 ("prompt_ids", "rejected_ids")]
        seqs, masks = [], []
        for prompt_key, answer_key in parts:
            for ex in examples:
                ids = list(ex[prompt_key]) + list(ex[answer_key])
                mask = [0] * len(ex[prompt_key]) + [1] * len(ex[answer_key])
                if self.max_length is not None:
                    ids, mask = ids[:self.max_length], mask[:self.max_length]
                seqs.append(ids)
                masks.append(mask)
        longest = max(len(s) for s in seqs)
        input_ids = torch.full((len(seqs), longest), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(seqs), longest), dtype=torch.long)
        completion = torch.zeros((len(seqs), longest), dtype=torch.long)
        for row, (ids, mask) in enumerate(zip(seqs, masks)):
            input_ids[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention[row, :len(ids)] = 1
            completion[row, :len(ids)] = torch.tensor(mask, dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": attention, "completion_mask": completion}


class WRPOTrainer(DPOTrainer):
    """DPOTrainer whose loss is WRPO's; datasets carry a ``target_chosen`` answer beside ``chosen`` and ``rejected``."""

    def __init__(self, *args, wrpo_alpha: float = 0.5, wrpo_ramp: float = 1.0, **kwargs):
        self.wrpo_final_alpha = wrpo_alpha
        self.wrpo_ramp = wrpo_ramp
        super().__init__(*args, **kwargs)
        if kwargs.get("data_collator") is None:  # DPOTrainer's default batches two answers per pair
            self.data_collator = WRPOCollator(pad_token_id=self._tokenizer.pad_token_id, max_length=self.args.max_length)

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        if TARGET_CHOSEN not in dataset.column_names:
            raise ValueError(f"WRPO needs a {TARGET_CHOSEN!r} answer in every record of the {dataset_name} dataset")
        main = super()._prepare_dataset(dataset.remove_columns([TARGET_CHOSEN]), processing_class, args,
                                        dataset_name)
        own = dataset.remove_columns(["chosen"]).rename_column(TARGET_CHOSEN, "chosen")
        own = super()._prepare_dataset(own, processing_class, args, f"{dataset_name} (target's own answers)")
        # The same prompts, so the same rows survive the length filter; the prompt is kept per answer in case
        # the template joins prompt and answer differently.
        return main.add_column("target_prompt_ids", own["prompt_ids"]).add_column("target_chosen_ids",
                                                                                  own["chosen_ids"])

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = ["prompt_ids", "chosen_ids", "rejected_ids", "target_prompt_ids",
                                       "target_chosen_ids"]

    def current_alpha(self) -> float:
        return wrpo_alpha(self.wrpo_final_alpha, self.wrpo_ramp, self.state.global_step, self.state.max_steps)

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        ids, attention, completion = inputs["input_ids"], inputs["attention_mask"], inputs["completion_mask"]
        logps = sequence_logps(model(input_ids=ids, attention_mask=attention, use_cache=False).logits, ids,
                               completion)
        with torch.no_grad():
            ref_logits = self.ref_model(input_ids=ids, attention_mask=attention, use_cache=False).logits
            ref_logps = sequence_logps(ref_logits, ids, completion)
        ws, wt, lo = logps.chunk(3)
        rws, rwt, rlo = ref_logps.chunk(3)
        alpha = self.current_alpha()
        loss = wrpo_loss(ws, wt, lo, rws, rwt, rlo, alpha, self.beta).mean()
        chosen = self.beta * (alpha * (ws - rws) + (1 - alpha) * (wt - rwt)).detach()
        rejected = self.beta * (lo - rlo).detach()
        metrics = self._metrics[mode]
        metrics["wrpo/alpha"].append(alpha)
        metrics["rewards/chosen"].append(self.accelerator.gather(chosen).mean().item())
        metrics["rewards/rejected"].append(self.accelerator.gather(rejected).mean().item())
        metrics["rewards/accuracies"].append(self.accelerator.gather((chosen > rejected).float()).mean().item())
        metrics["rewards/margins"].append(self.accelerator.gather(chosen - rejected).mean().item())
        if return_outputs:
            return loss, {"logps": logps}
        return loss
