"""Merge methods as functions of tensors: one output tensor from the pivot's and the targets'.

VaRM (FuseChat) and SCE (FuseChat-2.0) are written here; linear, task arithmetic,
TIES, DARE and SLERP are mergekit's own implementations, called through its
tensor API (``mergekit.merge_methods.merge_tensors``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

VARIATIONS = ("square", "abs")


def variation(delta: torch.Tensor, kind: str = "square") -> float:
    """Mean squared (or absolute) change of one tensor: the VaRM statistic."""
    d = delta.float()
    if d.data_ptr() == delta.data_ptr():
        d = d.clone()  # the caller's tensor stays as it was
    return float((d.square_() if kind == "square" else d.abs_()).mean()) if d.numel() else 0.0


def varm_weights(variations: list[float]) -> list[float]:
    """W_j = V_j / Σ V_j'; equal weights when nothing moved (FuseChat eq. 6)."""
    total = sum(variations)
    if total <= 0:
        return [1.0 / len(variations)] * len(variations)
    return [v / total for v in variations]


def weighted_sum(tensors: list[torch.Tensor], weights: list[float], dtype: torch.dtype) -> torch.Tensor:
    """Σ_j W_j θ_j in fp32 (fp64 stays fp64), cast to ``dtype``."""
    acc_dtype = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    out = torch.zeros(tensors[0].shape, dtype=acc_dtype)
    for t, w in zip(tensors, weights):
        out.add_(t.to(acc_dtype), alpha=w)
    return out.to(dtype)


def sce(pivot: torch.Tensor, targets: list[torch.Tensor], select_fraction: float = 0.1,
        select: str = "mask") -> tuple[torch.Tensor, list[float]]:
    """SCE (FuseChat-2.0): select, calculate, erase, merge. Returns the tensor and the weights.

    select: the ``select_fraction`` of elements whose deltas vary most across the
    targets (of those that vary at all). ``select="mask"`` zeroes the other elements
    of every delta before the weights, the sign election and the merge (as
    mergekit); ``select="weights"`` uses the selection for the weights only and
    erases and merges the full deltas.
    calculate: W_j ∝ mean of the selected squared deltas of target j.
    erase: drop the elements whose sign disagrees with the sign of the summed deltas
    (a zero sum counts as positive, and zero deltas are dropped, as in TIES).
    merge: θ = θ_pivot + Σ_j W_j E_j Δ_j / Σ_j W_j E_j.
    """
    acc = torch.float64 if pivot.dtype == torch.float64 else torch.float32
    base = pivot.to(acc)
    deltas = torch.stack([t.to(acc) - base for t in targets])  # (J, ...)
    mask = _variance_topk_mask(deltas, select_fraction).to(acc)
    selected = deltas * mask
    weights = varm_weights([float(d.square().mean()) for d in selected])
    merged_deltas = selected if select == "mask" else deltas
    majority = torch.where(merged_deltas.sum(dim=0) >= 0, 1.0, -1.0).to(acc)  # ties go to +, as TIES
    erase = (torch.sign(merged_deltas) == majority).to(acc)  # zero deltas never vote
    w = torch.tensor(weights, dtype=acc).reshape(-1, *([1] * pivot.dim()))
    kept = w * erase
    merged = (merged_deltas * kept).sum(dim=0) / kept.sum(dim=0).clamp(min=1e-6)
    return (base + merged).to(pivot.dtype), weights


def _variance_topk_mask(deltas: torch.Tensor, fraction: float) -> torch.Tensor:
    if fraction >= 1:
        return torch.ones_like(deltas[0], dtype=torch.bool)
    var = deltas.var(dim=0, unbiased=False)
    k = int(torch.count_nonzero(var) * fraction)
    mask = torch.zeros(var.numel(), dtype=torch.bool)
    if k > 0:
        mask[var.reshape(-1).topk(k).indices] = True
    return mask.reshape(var.shape)


# ---------------------------------------------------------------- mergekit baselines


@dataclass(frozen=True)
class Baseline:
    """A mergekit method and how fusechat calls it."""

    mergekit_name: str
    uses_base: bool
    paper: str


BASELINES = {
    "linear": Baseline("linear", False, "https://arxiv.org/abs/2203.05482"),
    "task_arithmetic": Baseline("task_arithmetic", True, "https://arxiv.org/abs/2212.04089"),
    "ties": Baseline("ties", True, "https://arxiv.org/abs/2306.01708"),
    "dare": Baseline("dare_linear", True, "https://arxiv.org/abs/2311.03099"),
    "slerp": Baseline("slerp", False, "https://arxiv.org/abs/2403.13257"),
}


def mergekit_merge(method: str, pivot: torch.Tensor, targets: list[torch.Tensor], weights: list[float],
                   density: float, ta_scale: float, slerp_t: float) -> torch.Tensor:
    """One tensor merged by mergekit's implementation of ``method``."""
    from mergekit.merge_methods import merge_tensors

    spec = BASELINES[method]
    n = len(targets)
    if method == "linear":
        return merge_tensors(targets, "linear", parameters={"weight": weights, "normalize": True})
    if method == "slerp":
        if n == 2:
            return merge_tensors(targets, "slerp", parameters={"t": slerp_t}, base_index=0)
        # More than two: mergekit's spherical average of several models.
        return merge_tensors(targets, "multislerp", parameters={"weight": weights})
    ids = list(range(n + 1))
    params = {"weight": {i + 1: weights[i] for i in range(n)}, "lambda": ta_scale}
    if method in ("ties", "dare"):
        params["density"] = {i + 1: density for i in range(n)}
    return merge_tensors([pivot, *targets], spec.mergekit_name, parameters=params, ids=ids, base_index=0)


MethodFn = Callable[..., torch.Tensor]
ALL_METHODS = ("varm", "sce", *BASELINES)
