"""sacpo_jax: constrained alignment (SACPO, P-SACPO, CAID) for LLaMA-family models in JAX."""

from sacpo_jax.api import load_model, sequence_logprobs
from sacpo_jax.models.hf import save_checkpoint as save_model

__all__ = ["load_model", "save_model", "sequence_logprobs"]
__version__ = "0.1.0"
