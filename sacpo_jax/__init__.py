"""sacpo_jax: constrained alignment (SACPO, P-SACPO, CAID) for LLaMA-family models in JAX."""
