"""One-shot pruning: magnitude, Wanda and SparseGPT, and the layer-by-layer driver."""

from sparsekit.prune.magnitude import magnitude_prune, mask_from_scores
from sparsekit.prune.sequential import prune_model
from sparsekit.prune.solvers import SOLVERS, Solver
from sparsekit.prune.sparsegpt import HessianError, sparsegpt_prune
from sparsekit.prune.wanda import wanda_prune

__all__ = ["magnitude_prune", "mask_from_scores", "wanda_prune", "sparsegpt_prune", "prune_model",
           "HessianError", "SOLVERS", "Solver"]
