"""One-shot pruning: magnitude, Wanda and SparseGPT, and the layer-by-layer driver."""

from sparsekit.prune.magnitude import magnitude_prune, mask_from_scores

__all__ = ["magnitude_prune", "mask_from_scores"]
