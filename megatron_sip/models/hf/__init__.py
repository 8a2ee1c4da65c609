"""Hugging Face models in and out: ``config.json`` <-> :class:`ModelConfig` (``config.py``), tensor
names and layouts (``weights.py``), and the two conversions (``convert.py``) behind
``tools/convert_checkpoint.py``. The model itself is always Megatron-Core's GPTModel."""
