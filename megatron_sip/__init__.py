"""megatron-sip: Self-Improving Pretraining (arXiv 2601.21343) on Megatron-Core."""

import warnings

# Megatron-Core announces every optional accelerator library it does not find; on CPU that is all
# of them, on every rank. The fallbacks are what the CPU path is meant to use.
warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine).* not installed.*")
warnings.filterwarnings("ignore", message=r".*Transformer Engine and Apex are not installed.*")

__version__ = "0.1.0"
