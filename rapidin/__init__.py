"""rapidin: token-wise influential training data retrieval for LLMs (RapidIn, Lin et al., ACL 2024)."""

__version__ = "0.1.0"
