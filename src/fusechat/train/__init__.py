"""Training the targets: the sparse fusion loss, data, a Trainer, and the stage."""

from fusechat.train.stage import run

__all__ = ["run"]
