"""Sampling from a policy: k responses per prompt for online methods, and held-out evaluation."""
