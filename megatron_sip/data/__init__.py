"""Tokenizers, indexed datasets and (prefix, suffix) samples."""
