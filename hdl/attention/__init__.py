"""Attention blocks: RoPE, scores, softmax and the weighted sum over V (models/attention.py)."""
