"""fusechat's own merge methods as functions of tensors: VaRM (FuseChat) and SCE (FuseChat-2.0).

Every other method is mergekit's code (``fusechat.merge.mergekit_methods``).
"""

from __future__ import annotations

import torch

from fusechat.merge.registry import Merged, Param, merge_method


def mean_variation(delta: torch.Tensor, kind: str = "square") -> float:
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


# ---------------------------------------------------------------- registered


@merge_method(
    "varm", "VaRM (FuseChat)", "https://arxiv.org/abs/2402.16107",
    params=(
        Param("granularity", "matrix", "one weight set per matrix, per layer, or for the whole model",
              choices=("matrix", "layer", "model")),
        Param("variation", "square", "the statistic of the deltas: mean square (the paper) or mean absolute value",
              choices=("square", "abs")),
    ),
    min_targets=2, delta_weighted=True,
)
def varm(pivot: torch.Tensor, targets: list[torch.Tensor], *, granularity: str = "matrix",
         variation: str = "square") -> Merged:
    """One matrix merged with its own VaRM weights (the stage pools the statistic per layer or model itself)."""
    weights = varm_weights([mean_variation(t.float() - pivot.float(), variation) for t in targets])
    return Merged(weighted_sum(targets, weights, pivot.dtype), weights)


@merge_method(
    "sce", "SCE (FuseChat-2.0)", "https://arxiv.org/abs/2408.07990",
    params=(
        Param("select_fraction", 0.1, "share of the elements whose deltas vary most across the targets"),
        Param("select", "mask", "the selection masks the deltas (mergekit) or only sets the weights "
                                "(FuseChat-2.0 code)", choices=("mask", "weights")),
    ),
)
def sce_method(pivot: torch.Tensor, targets: list[torch.Tensor], *, select_fraction: float = 0.1,
               select: str = "mask") -> Merged:
    return Merged(*sce(pivot, targets, select_fraction, select))
