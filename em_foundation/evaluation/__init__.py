"""Evaluation at native resolution: stitch tile predictions, then pool pixel counts."""
