"""The FuseChat training loss: λ·CE(gold) + (1 − λ)·CE(student, fused distribution), sparse.

The fused target stays top-k: the fusion term gathers the student's
log-probabilities at the k target ids, so no vocabulary-sized target tensor is
built (the research code builds batch × length × vocab dense targets; the tests hold
this loss against that dense one, ``tests/references.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


@dataclass
class LossParts:
    loss: torch.Tensor
    gold: torch.Tensor  # mean CE on the gold next tokens
    fusion: torch.Tensor  # mean CE (or KL) against the fused distributions
    gold_tokens: int
    fusion_positions: int


def teacher_with_temperature(probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """q^(1/T) renormalised over the kept ids: softmax(logits / T) restricted to the top k."""
    if temperature == 1.0:
        return probs
    sharpened = torch.where(probs > 0, probs.clamp_min(1e-30) ** (1.0 / temperature), torch.zeros_like(probs))
    return sharpened / sharpened.sum(dim=-1, keepdim=True).clamp_min(1e-30)


def fusion_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    fused_ids: torch.Tensor | None,
    fused_probs: torch.Tensor | None,
    fusion_mask: torch.Tensor | None,
    lambda_: float,
    kind: str = "ce",
    temperature: float = 1.0,
) -> LossParts:
    """logits: (B, T, V); labels: (B, T), −100 where no loss; position t is scored on token t + 1.

    Per position: λ·CE(gold) + (1 − λ)·CE(fused) where the position is in the fusion term,
    CE(gold) alone where it is not (a gated sequence, a dropped position); the mean over
    the positions with either term. Where every gold position is in the fusion term (the
    paper's case) this is λ·mean CE(gold) + (1 − λ)·mean CE(fused).

    fused_ids, fused_probs: (B, T, k), the target distribution at position t (predicting
    token t + 1); fusion_mask: (B, T) True where position t is in the fusion term.
    With ``lambda_ == 1`` the fused tensors are not used and may be None.
    """
    if not 0.0 <= lambda_ <= 1.0:
        raise ValueError(f"lambda must be in [0, 1], got {lambda_}")
    logprobs = F.log_softmax(logits[:, :-1].float(), dim=-1)  # (B, T-1, V)
    targets = labels[:, 1:]
    gold_mask = targets != IGNORE_INDEX
    gold_nll = -logprobs.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)  # (B, T-1)
    n_gold = int(gold_mask.sum())
    gold = (gold_nll * gold_mask).sum() / max(n_gold, 1)

    zero = logprobs.new_zeros(())
    if lambda_ == 1.0 or fused_ids is None:
        return LossParts(gold, gold.detach(), zero, n_gold, 0)
    ids = fused_ids[:, :-1].long()  # (B, T-1, k)
    q = teacher_with_temperature(fused_probs[:, :-1].float(), temperature)
    mask = fusion_mask[:, :-1]
    student = logprobs.gather(-1, ids)  # (B, T-1, k)
    per_position = -(q * student).sum(-1)
    if kind == "kl":
        per_position = per_position + torch.where(q > 0, q * q.clamp_min(1e-30).log(), torch.zeros_like(q)).sum(-1)
    n_fusion = int(mask.sum())
    fusion = (per_position * mask).sum() / max(n_fusion, 1)
    gold_weight = torch.where(mask, lambda_, 1.0)
    loss = ((gold_nll * gold_mask * gold_weight).sum() + (1.0 - lambda_) * (per_position * mask).sum()) / max(
        int((gold_mask | mask).sum()), 1)
    return LossParts(loss, gold.detach(), fusion.detach(), n_gold, n_fusion)
