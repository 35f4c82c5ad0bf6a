"""SACPO stage chains, merging, CAID and dual solvers."""
