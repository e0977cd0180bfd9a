"""Merge methods run by mergekit's own code, in the same registry as fusechat's.

The paper's baselines keep fusechat's names and parameters (``linear``, ``task_arithmetic``,
``ties``, ``dare``, ``slerp``); every other method the installed mergekit ships is
registered under mergekit's name with mergekit's parameters, read from its method
specs (``weight`` is called ``weights`` and ``lambda`` ``scale`` here; a missing
``weights`` means equal weights). The pivot is the base model of every method that
takes one.
"""

from __future__ import annotations

import inspect

import torch
from mergekit.merge_methods import BasePolicy, ParameterScope, merge_tensors, registered_methods

from fusechat.merge.registry import METHODS, REQUIRED, Merged, MergeMethod, Param, check_signature, merge_method

WEIGHTS = Param("weights", None, "one weight per target (default: equal weights)", per_target=True)
DENSITY = Param("density", 0.5, "share of each delta kept")
SCALE = Param("scale", 1.0, "scale of the merged delta (task arithmetic's λ)")


def _equal(weights: list[float] | None, n: int) -> list[float]:
    return list(weights) if weights is not None else [1.0 / n] * n


def _with_pivot(method: str, pivot, targets, params: dict) -> torch.Tensor:
    return merge_tensors([pivot, *targets], method, parameters=params, ids=list(range(len(targets) + 1)),
                         base_index=0)


@merge_method("linear", "Linear (model soups)", "https://arxiv.org/abs/2203.05482", params=(WEIGHTS,),
              implementation="mergekit")
def linear(pivot, targets, *, weights=None) -> Merged:
    w = _equal(weights, len(targets))
    return Merged(merge_tensors(targets, "linear", parameters={"weight": w, "normalize": True}), None)


@merge_method("task_arithmetic", "Task arithmetic", "https://arxiv.org/abs/2212.04089", params=(WEIGHTS, SCALE),
              implementation="mergekit")
def task_arithmetic(pivot, targets, *, weights=None, scale=1.0) -> Merged:
    w = _equal(weights, len(targets))
    params = {"weight": {i + 1: w[i] for i in range(len(targets))}, "lambda": scale}
    return Merged(_with_pivot("task_arithmetic", pivot, targets, params), None)


def _sparse_task_arithmetic(method: str, pivot, targets, weights, density, scale) -> Merged:
    n = len(targets)
    w = _equal(weights, n)
    params = {"weight": {i + 1: w[i] for i in range(n)}, "lambda": scale,
              "density": {i + 1: density for i in range(n)}}
    return Merged(_with_pivot(method, pivot, targets, params), None)


@merge_method("ties", "TIES", "https://arxiv.org/abs/2306.01708", params=(WEIGHTS, DENSITY, SCALE),
              implementation="mergekit")
def ties(pivot, targets, *, weights=None, density=0.5, scale=1.0) -> Merged:
    return _sparse_task_arithmetic("ties", pivot, targets, weights, density, scale)


@merge_method("dare", "DARE (linear)", "https://arxiv.org/abs/2311.03099", params=(WEIGHTS, DENSITY, SCALE),
              implementation="mergekit")
def dare(pivot, targets, *, weights=None, density=0.5, scale=1.0) -> Merged:
    return _sparse_task_arithmetic("dare_linear", pivot, targets, weights, density, scale)


@merge_method("slerp", "SLERP (multi-SLERP beyond two targets)", "https://arxiv.org/abs/2403.13257",
              params=(Param("t", 0.5, "position between the two targets"), WEIGHTS), implementation="mergekit")
def slerp(pivot, targets, *, t=0.5, weights=None) -> Merged:
    if len(targets) == 2:
        return Merged(merge_tensors(targets, "slerp", parameters={"t": t}, base_index=0), None)
    # More than two: mergekit's spherical average of several models.
    return Merged(merge_tensors(targets, "multislerp", parameters={"weight": _equal(weights, len(targets))}), None)


# ---------------------------------------------------------------- every other method mergekit ships

RENAMED = {"weight": "weights", "lambda": "scale"}  # mergekit's names that are not Python parameter names here
NOT_REGISTERED = {
    "sce": "fusechat's own SCE (tested equal to mergekit's)",
    "passthrough": "copies one model: nothing to fuse",
}


def _register_mergekit(spec) -> None:
    uses_base = spec.contract.base != BasePolicy.IGNORED
    params = tuple(
        Param(RENAMED.get(p.name, p.name),
              None if p.name == "weight" and p.required else (REQUIRED if p.required else p.default),
              p.description or "", per_target=p.scope != ParameterScope.SHARED)
        for p in spec.parameters
    )

    def merge(pivot, targets, **settings) -> Merged:
        n = len(targets)
        inputs = [pivot, *targets] if uses_base else list(targets)
        target_ids = list(range(1, n + 1)) if uses_base else list(range(n))
        values = {}
        for p in spec.parameters:
            value = settings[RENAMED.get(p.name, p.name)]
            if p.name == "weight" and value is None:
                value = _equal(None, n)
            if p.scope != ParameterScope.SHARED:
                value = dict(zip(target_ids, value if isinstance(value, list) else [value] * n))
            values[p.name] = value
        out = merge_tensors(inputs, spec.name, parameters=values, ids=list(range(len(inputs))),
                            base_index=0 if uses_base else None)
        return Merged(out, None)

    merge.__signature__ = inspect.Signature(
        [inspect.Parameter("pivot", inspect.Parameter.POSITIONAL_OR_KEYWORD),
         inspect.Parameter("targets", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
        + [inspect.Parameter(p.name, inspect.Parameter.KEYWORD_ONLY,
                             default=inspect.Parameter.empty if p.default is REQUIRED else p.default)
           for p in params])
    merge.__qualname__ = f"mergekit:{spec.name}"
    check_signature(merge, params)
    contract = spec.contract
    extra = 1 if uses_base else 0  # the pivot counts as an input
    lows = [1, (contract.min_inputs or 0) - extra, contract.min_non_base or 0]
    highs = [h for h in ((contract.max_inputs - extra) if contract.max_inputs is not None else None,
                         contract.max_non_base) if h is not None]
    METHODS[spec.name] = MergeMethod(spec.name, spec.pretty_name or spec.name, spec.reference_url, params, merge,
                                     implementation="mergekit", min_targets=max(lows),
                                     max_targets=min(highs) if highs else None)


for _method in registered_methods():
    if _method.spec.name not in METHODS and _method.spec.name not in NOT_REGISTERED:
        _register_mergekit(_method.spec)
