"""Implicit fusion (FuseChat-3.0, WRPO): the sources answer the training prompts, the answers are scored,
and the pivot learns from the best of them by SFT, then from preference pairs by DPO or WRPO."""
