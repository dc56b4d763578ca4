"""Flax modules: the T5.1.1 encoder and the dual-encoder architectures built on it."""
