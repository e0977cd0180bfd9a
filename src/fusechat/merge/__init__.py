"""Stage 6, merge: the targets in parameter space, with VaRM, SCE or any method of the registry."""

from fusechat.merge import mergekit_methods, methods  # noqa: F401  (each module registers its methods)
from fusechat.merge.stage import run

__all__ = ["run"]
