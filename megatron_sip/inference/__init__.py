"""Rollouts (KV-cached sampling, shared-prefix) and shared-prefix candidate scoring."""
