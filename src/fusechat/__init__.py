"""fusechat: fuse chat LLMs of different architectures and tokenizers into one model."""

__version__ = "0.1.0"
