"""Evaluation: the backdoor-retrieval and error-tracing metrics of merged scores (metrics)."""
