"""Preference data: sources, adapters, tokenisation, loader and the bundled oracle task."""
