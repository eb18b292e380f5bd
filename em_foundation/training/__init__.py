"""Training: the loss, the segmenters per regime, and the early-stopping loop."""
