"""dpr-jax: Dense Passage Retrieval (Karpukhin et al., EMNLP 2020) in JAX/Flax."""

__version__ = "0.1.0"
