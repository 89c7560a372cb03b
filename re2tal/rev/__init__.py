"""Rewiring residual stages into reversible ones (Re²TAL). Knows nothing of particular models."""
