"""Interpretability: per-layer hidden states, prompt families and representation analyses."""
