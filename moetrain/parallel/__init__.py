"""Parallelism and memory plans applied to a built model from outside: recomputation, data parallelism."""
