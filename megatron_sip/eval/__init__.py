"""Evaluation: judge agreement, win rates, safety, factuality, multiple-choice benchmarks."""
