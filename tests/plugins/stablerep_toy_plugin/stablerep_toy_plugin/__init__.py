"""Toy StableRep parts, found through entry points (see pyproject.toml); imports nothing heavy here."""
