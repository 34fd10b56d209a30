"""maml-ds: MAML-en-LLM and MetaICL meta-training on DeepSpeed."""

__version__ = "0.1.0"
