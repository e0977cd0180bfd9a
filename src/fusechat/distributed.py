"""Process state under `accelerate launch` / torchrun (a single process otherwise)."""

from __future__ import annotations


def process_state(device: str = "auto"):
    """accelerate's ``PartialState``; on machines without CUDA the processes join over gloo."""
    import torch
    from accelerate import PartialState

    # accelerate only forms a CPU process group when asked for the CPU explicitly.
    return PartialState(cpu=device == "cpu" or not torch.cuda.is_available())
