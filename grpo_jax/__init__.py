"""grpo_jax: DeepSeek-R1-style reinforcement learning of language models with GRPO, in JAX."""

import logging

# transformers serves only tokenizers and configs to this JAX package: its notice, on import, that PyTorch is
# missing says nothing to a user of grpo_jax (set before grpo_jax.models can import transformers).
logging.getLogger("transformers").addFilter(lambda record: "PyTorch was not found" not in record.getMessage())

from grpo_jax.models import (
    ModelConfig,
    Transformer,
    load_pretrained,
    load_tokenizer,
    save_pretrained,
)

__version__ = "0.1.0"

__all__ = ["ModelConfig", "Transformer", "load_pretrained", "load_tokenizer", "save_pretrained"]
