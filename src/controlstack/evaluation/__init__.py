"""Metrics and the scripts that reproduce the papers' claims (condition fidelity, FID, TV, ...)."""

#: ``measure_asym``'s defaults (evaluation/asym.py), kept here so that ``controlstack --help`` shows them
#: without importing torch
ASYM_BATCH, ASYM_STEPS = 16, 16
