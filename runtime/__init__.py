"""inferbox runtime: hardware probe, backends, selection, model packages, sessions.

Imports neither torch, transformers, Litestar nor SQLite.
"""
