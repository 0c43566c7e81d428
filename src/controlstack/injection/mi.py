"""Minimal Impact ControlNet injection (being written)."""
