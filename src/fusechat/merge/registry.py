"""Every merge method fusechat runs: one registered function each, with its parameters and its paper.

A method is a function of tensors ``merge(pivot, targets, **params) -> Merged`` registered
with ``@merge_method``, which checks the function's keyword parameters against the
declared ``Param``s (names and defaults), so the registry and the code cannot drift.
fusechat's own methods (VaRM, SCE) live in ``fusechat.merge.methods``; the baselines
and every other method the installed mergekit ships run mergekit's own code
(``fusechat.merge.mergekit_methods``). A run config chooses methods by name and gives
each its parameters under ``merge.params.<method>``; ``check_merge_settings`` reports
every unknown method or parameter at once.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

REQUIRED = object()  # a parameter with no default: the config must give it


class Merged(NamedTuple):
    tensor: Any  # torch.Tensor
    weights: list[float] | None  # per-target weights the method used, when it has such weights


@dataclass(frozen=True)
class Param:
    name: str
    default: Any = REQUIRED
    help: str = ""
    per_target: bool = False  # one value for every target, or a list with one value per target
    choices: tuple | None = None


@dataclass(frozen=True)
class MergeMethod:
    name: str
    title: str
    paper: str | None
    params: tuple[Param, ...]
    merge: Callable[..., Merged]
    implementation: str = "fusechat"  # or "mergekit"
    min_targets: int = 1
    max_targets: int | None = None
    # A weighted sum of the targets whose weights come from their deltas' statistics (VaRM): the merge
    # stage computes the weights first (per matrix, layer or model) and then streams the sum in blocks.
    delta_weighted: bool = False

    def settings(self, given: dict[str, Any], n_targets: int) -> dict[str, Any]:
        """The method's parameters: ``given`` checked, defaults filled in. Raises ValueError naming the problem."""
        problems = self.problems(given, n_targets)
        if problems:
            raise ValueError("; ".join(problems))
        return {p.name: given.get(p.name, p.default) for p in self.params}

    def problems(self, given: dict[str, Any], n_targets: int | None) -> list[str]:
        """Every problem of ``given``; the counts of targets are checked only when ``n_targets`` is known."""
        known = {p.name: p for p in self.params}
        out = []
        for key in given:
            if key not in known:
                close = difflib.get_close_matches(key, list(known), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else f" ({self.name} takes: {_names(self.params)})"
                out.append(f"merge.params.{self.name}.{key}: unknown parameter{hint}")
        for p in self.params:
            value = given.get(p.name, p.default)
            where = f"merge.params.{self.name}.{p.name}"
            if value is REQUIRED:
                out.append(f"{where} is required ({p.help or 'no default'})")
            elif p.choices is not None and value not in p.choices:
                out.append(f"{where} must be one of {', '.join(map(str, p.choices))}, got {value!r}")
            elif p.per_target and isinstance(value, list) and n_targets is not None and len(value) != n_targets:
                out.append(f"{where} has {len(value)} values for {n_targets} targets")
        if n_targets is None:
            return out
        if n_targets < self.min_targets or (self.max_targets is not None and n_targets > self.max_targets):
            wanted = (f"exactly {self.min_targets}" if self.min_targets == self.max_targets else
                      f"at least {self.min_targets}" if self.max_targets is None else
                      f"{self.min_targets} to {self.max_targets}")
            out.append(f"merge method {self.name!r} merges {wanted} targets, this run has {n_targets}")
        return out


METHODS: dict[str, MergeMethod] = {}


def merge_method(name: str, title: str, paper: str | None, params: tuple[Param, ...] = (), **options):
    """Register ``fn(pivot, targets, **params) -> Merged`` as the method ``name``; its keyword-only
    parameters must be exactly ``params``, with the same defaults."""
    def register(fn: Callable[..., Merged]) -> Callable[..., Merged]:
        check_signature(fn, params)
        if name in METHODS:
            raise ValueError(f"merge method {name!r} is registered twice")
        METHODS[name] = MergeMethod(name, title, paper, tuple(params), fn, **options)
        return fn
    return register


def check_signature(fn: Callable, params: tuple[Param, ...]) -> None:
    sig = inspect.signature(fn)
    positional = [p for p in sig.parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    keywords = {n: p for n, p in sig.parameters.items() if p.kind == p.KEYWORD_ONLY}
    if [p.name for p in positional] != ["pivot", "targets"]:
        raise TypeError(f"{fn.__qualname__}: a merge function takes (pivot, targets, *, params...)")
    if set(keywords) != {p.name for p in params}:
        raise TypeError(f"{fn.__qualname__}: keyword parameters {sorted(keywords)} differ from the declared "
                        f"{sorted(p.name for p in params)}")
    for p in params:
        default = keywords[p.name].default
        declared = inspect.Parameter.empty if p.default is REQUIRED else p.default
        if default is not declared and default != declared:
            raise TypeError(f"{fn.__qualname__}: parameter {p.name!r} defaults to {default!r}, "
                            f"the registry says {p.default!r}")


def merge_method_named(name: str) -> MergeMethod:
    if name not in METHODS:
        close = difflib.get_close_matches(name, list(METHODS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown merge method {name!r}{hint}; methods: {', '.join(METHODS)}")
    return METHODS[name]


def check_merge_settings(methods: list[str], params: dict[str, dict], n_targets: int | None = None) -> list[str]:
    """Every problem of the chosen methods and of ``merge.params`` (only the chosen methods' are checked)."""
    problems = []
    for name in methods:
        try:
            problems += merge_method_named(name).problems(params.get(name) or {}, n_targets)
        except ValueError as e:
            problems.append(f"merge: {e}")
    for name in params:
        if name not in methods:
            problems.append(f"merge.params.{name}: {name!r} is neither merge.method nor one of merge.baselines")
    return problems


def _names(params: tuple[Param, ...]) -> str:
    return ", ".join(p.name for p in params) or "no parameters"
