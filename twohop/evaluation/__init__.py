"""Evaluation: batched generation, candidate scoring, grading, and the study's evaluators."""
