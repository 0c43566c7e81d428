"""Metrics and the scripts that reproduce the papers' claims (condition fidelity, FID, TV, ...)."""
