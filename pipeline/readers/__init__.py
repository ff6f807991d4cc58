"""Corpus readers: every source format normalised to documents (see base.py)."""
