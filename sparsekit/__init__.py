"""sparsekit: sparse fine-tuning for inference acceleration of LLMs, reproduced at laptop scale.

Subpackages: ``prune`` (magnitude, Wanda, SparseGPT), ``formats`` (compressed sparse weights),
``kernels`` (C CPU kernels and ``SparseLinear``), ``tasks`` (the three embedded tasks and their
teachers). Modules: ``masks``, ``blocks``, ``patterns``, ``book`` (runs and builds the book),
``book_check`` (checks the built book in a browser), ``cli`` (the ``sparsekit`` command).
Sparse fine-tuning (``distill``), quantization (``quant``) and GPU kernels are planned (README, Roadmap).
"""

__version__ = "0.1.0"
