"""sparsekit: sparse fine-tuning for inference acceleration of LLMs, reproduced at laptop scale.

Subpackages: ``prune`` (magnitude, Wanda, SparseGPT), ``distill`` (CE, KD, SquareHead, trainer),
``quant`` (RTN, GPTQ), ``formats`` (compressed weights), ``kernels`` (CPU and Triton), ``tasks``
(the three embedded tasks). See DESIGN.md for the public API.
"""

__version__ = "0.1.0"
