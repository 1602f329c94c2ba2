"""The pruning methods that :func:`sparsekit.prune.prune_model` knows: one entry per method.

A :class:`Solver` prunes one layer's weight ``W`` ``[out, in]`` given the statistics of its calibration
inputs. Adding a method is adding an entry to :data:`SOLVERS`; the driver needs no change.

Counting conventions (ours, then the reference code's): unstructured sparsity ``s`` prunes
``round(s · n)`` weights per unit, the unit being a row (magnitude with ``scope="row"``, Wanda), the
whole layer (magnitude with ``scope="layer"``) or a block of ``blocksize`` columns (SparseGPT); the
references prune ``int(s · n)`` (Wanda) or every weight whose score is ``<=`` the ``int(s · n)``-th
smallest, usually ``int(s · n) + 1`` (SparseGPT, the papers' magnitude). ``nm=(n, m)`` keeps ``n`` of every
``m``; the references' ``prunen:prunem`` prunes ``prunen`` (our 2:4 is their 2:4, our 1:4 their 3:4).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from sparsekit import _validate
from sparsekit.prune.magnitude import SCOPES, magnitude_prune
from sparsekit.prune.sparsegpt import solver_options, sparsegpt_prune
from sparsekit.prune.statistics import HessianStats
from sparsekit.prune.wanda import wanda_prune

__all__ = ["Solver", "SOLVERS"]

PruneFn = Callable[..., tuple]
"""``prune(W, stats, sparsity, nm, name, **options) -> (W_pruned, mask)``; ``stats`` is the layer's
:class:`~sparsekit.prune.statistics.HessianStats` (None when the method needs no calibration data and
none was given), ``name`` the layer's qualified name (for errors). Given option ``quant`` (a
:class:`~sparsekit.quant.QuantConfig`), it returns ``(W_quantized, mask, QuantizedLayer)``."""


@dataclass(frozen=True)
class Solver:
    """How one method prunes a layer.

    * ``prune``: see :data:`PruneFn`;
    * ``needs_calibration``: whether ``prune`` reads ``stats`` (then ``prune_model`` requires batches);
    * ``options``: the keyword options the method takes, with their defaults (e.g. SparseGPT's
      ``blocksize``); ``prune_model(..., **options)`` forwards them and refuses others;
    * ``check``: ``check(options, nm) -> options``, validates (and normalises) the options before any
      layer is touched, so that a bad option never leaves a half-pruned model.
    """

    prune: PruneFn
    needs_calibration: bool
    options: dict = field(default_factory=dict)
    check: Callable[[dict, tuple | None], dict] = lambda options, nm: options

    def resolve(self, method: str, options: dict, nm) -> dict:
        """The method's options: the defaults updated with ``options``, checked."""
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            raise TypeError(f"method {method!r} takes no option(s) {unknown}; it takes "
                            f"{sorted(self.options) or 'none'}")
        return self.check({**self.options, **options}, nm)


def _sparsegpt(W, stats: HessianStats, sparsity, nm, name, blocksize, percdamp, quantizer=None, quant=None):
    if quant is not None and quant.is_joint("sparsegpt"):
        return quant.prune_jointly(W, stats.H, sparsity, nm, blocksize, percdamp, name)
    pruned, mask = sparsegpt_prune(W, stats.H, sparsity, nm, blocksize, percdamp, quantizer=quantizer,
                                   name=name)
    if quant is None:
        return pruned, mask
    return quant.finish(W, pruned, mask, stats.H, blocksize, percdamp, name)


def _check_sparsegpt(options: dict, nm) -> dict:
    blocksize, percdamp, _ = solver_options(options["blocksize"], options["percdamp"], nm)
    options = _check_quant("sparsegpt", options, nm)
    if options["quant"] is not None and options["quantizer"] is not None:
        raise ValueError("pass either quant (sparsekit's int8/int4 quantization) or a custom quantizer, "
                         "not both")
    return {**options, "blocksize": blocksize, "percdamp": percdamp}


def _wanda(W, stats: HessianStats, sparsity, nm, name, quant=None):
    pruned, mask = wanda_prune(W, stats.act_sq_norm, sparsity, nm)
    if quant is None:
        return pruned, mask
    return quant.finish(W, pruned, mask, stats.H, name=name)


def _magnitude(W, stats, sparsity, nm, name, scope, quant=None):
    pruned, mask = magnitude_prune(W, sparsity, nm, scope=scope)
    if quant is None:
        return pruned, mask
    return quant.finish(W, pruned, mask, None if stats is None else stats.H, name=name)


def _check_magnitude(options: dict, nm) -> dict:
    _validate.choice(options["scope"], "scope", SCOPES)
    return _check_quant("magnitude", options, nm)


def _check_quant(method: str, options: dict, nm) -> dict:
    """Option ``quant`` as a :class:`~sparsekit.quant.QuantConfig` (or None) that ``method`` can honour."""
    from sparsekit.quant import as_quant_config  # late: sparsekit.quant imports sparsekit.prune.sparsegpt

    quant = as_quant_config(options["quant"])
    if quant is not None:
        quant.check_method(method)
    return {**options, "quant": quant}


SOLVERS: dict[str, Solver] = {
    "sparsegpt": Solver(_sparsegpt, needs_calibration=True,
                        options={"blocksize": 128, "percdamp": 0.01, "quantizer": None, "quant": None},
                        check=_check_sparsegpt),
    "wanda": Solver(_wanda, needs_calibration=True, options={"quant": None},
                    check=lambda options, nm: _check_quant("wanda", options, nm)),
    "magnitude": Solver(_magnitude, needs_calibration=False, options={"scope": "row", "quant": None},
                        check=_check_magnitude),
}
