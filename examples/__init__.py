"""Runnable examples of trioworker: see README.md, "Examples"."""
