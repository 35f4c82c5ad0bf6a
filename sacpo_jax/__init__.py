"""sacpo_jax: constrained alignment (SACPO, P-SACPO, CAID) for LLaMA-family models in JAX."""

from sacpo_jax.api import load_model
from sacpo_jax.generate import generate
from sacpo_jax.models.hf import save_checkpoint as save_model
from sacpo_jax.scoring import sequence_logprobs

__all__ = ["generate", "load_model", "save_model", "sequence_logprobs"]
__version__ = "0.1.0"
