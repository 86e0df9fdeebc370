"""Scoring: queries × cached vectors and top-k (scores), on-the-fly scoring (stream), several checkpoints
(checkpoints), the curvature preconditioner (precondition) and token-wise influence (tokenwise)."""
