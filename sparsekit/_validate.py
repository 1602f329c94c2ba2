"""One input convention for the whole package, written once.

Every public function checks its arguments with these helpers, so that a bad argument fails the same way
everywhere:

* numbers are ``numbers.Real`` / ``numbers.Integral``: Python and numpy scalars and 0-d tensors are
  accepted, booleans (``True`` is not a sparsity, nor a count) are not;
* a value of the wrong *type* raises ``TypeError``, a value of the right type but outside what is allowed
  raises ``ValueError``;
* every message names the argument, shows its value and says what is allowed:
  ``sparsity must be in [0, 1) (a number: the fraction of weights set to zero); got 1.2``.

This module is the bottom of the package: it imports nothing from sparsekit (the formats use it and must
not pull in model-walking code), only the standard library and torch.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable

import torch

__all__ = ["real", "integer", "sparsity", "nm_pair", "choice", "tensor", "names", "finite", "parser_type"]


def _shown(value) -> str:
    """``value`` for an error message: its repr, shortened, with its type when that is not obvious."""
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    if isinstance(value, (bool, int, float, str, tuple, list, type(None))):
        return text
    return f"{text} (of type {type(value).__name__})"


def _is_bool(value) -> bool:
    if isinstance(value, torch.Tensor):
        return value.dtype == torch.bool
    return isinstance(value, bool) or type(value).__name__ == "bool_"  # numpy.bool_ is no Integral


def _scalar(value):
    """A 0-d (or one-element) numeric tensor as its Python number; anything else unchanged."""
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not _is_bool(value):
        return value.item()
    return value


def real(value, name: str, *, low: float | None = None, high: float | None = None, low_open: bool = False,
         high_open: bool = False, allowed: str | None = None) -> float:
    """``value`` as a finite ``float`` in the interval ``low .. high`` (closed unless ``*_open``).

    ``allowed`` describes the allowed values in messages (default: the interval). NaN and infinities are
    never allowed: every setting is a finite number.
    """
    if allowed is None:
        left = "(-inf" if low is None else f"{'(' if low_open else '['}{low:g}"
        right = "inf)" if high is None else f"{high:g}{')' if high_open else ']'}"
        allowed = f"a finite number in {left}, {right}"
    value = _scalar(value)
    if _is_bool(value) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {allowed}; got {_shown(value)}")
    number = float(value)
    inside = math.isfinite(number)
    if inside and low is not None:
        inside = number > low if low_open else number >= low
    if inside and high is not None:
        inside = number < high if high_open else number <= high
    if not inside:
        raise ValueError(f"{name} must be {allowed}; got {_shown(value)}")
    return number


def integer(value, name: str, *, low: int | None = None, high: int | None = None,
            allowed: str | None = None) -> int:
    """``value`` as an ``int`` with ``low <= value <= high`` (each bound optional)."""
    if allowed is None:
        if low is not None and high is not None:
            allowed = f"an integer in [{low}, {high}]"
        elif low is not None:
            allowed = "a positive integer" if low == 1 else f"an integer >= {low}"
        else:
            allowed = "an integer" if high is None else f"an integer <= {high}"
    value = _scalar(value)
    if _is_bool(value) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be {allowed}; got {_shown(value)}")
    number = int(value)
    if (low is not None and number < low) or (high is not None and number > high):
        raise ValueError(f"{name} must be {allowed}; got {_shown(value)}")
    return number


def sparsity(value, name: str = "sparsity") -> float:
    """A sparsity: the fraction of weights set to zero, ``0 <= s < 1``."""
    return real(value, name, low=0.0, high=1.0, high_open=True,
                allowed="in [0, 1) (a number: the fraction of weights set to zero)")


def nm_pair(value, name: str = "nm", in_features: int | None = None) -> tuple[int, int]:
    """An ``n:m`` pattern ``(n, m)``, ``0 < n < m``: keep ``n`` of every ``m`` consecutive inputs of a row.

    With ``in_features``, also ``in_features % m == 0`` (a row is a whole number of groups).
    """
    allowed = "a pair (n, m) of integers with 0 < n < m (keep n of every m inputs), e.g. (2, 4)"
    if isinstance(value, torch.Tensor) and value.dim() == 1:
        value = tuple(value.tolist())
    if not isinstance(value, (tuple, list)) or isinstance(value, str):
        raise TypeError(f"{name} must be {allowed}; got {_shown(value)}")
    if len(value) != 2:
        raise ValueError(f"{name} must be {allowed}; got {_shown(value)} with {len(value)} entries")
    entries = [_scalar(v) for v in value]
    if any(_is_bool(v) or not isinstance(v, numbers.Integral) for v in entries):
        raise TypeError(f"{name} must be {allowed}; got {_shown(value)}")
    n, m = (int(v) for v in entries)
    if not 0 < n < m:
        raise ValueError(f"{name} must be {allowed}; got {n}:{m}")
    if in_features is not None and in_features % m != 0:
        raise ValueError(f"{name}={n}:{m} needs in_features divisible by m={m}; "
                         f"got in_features={in_features}")
    return n, m


def choice(value, name: str, choices: Iterable):
    """``value`` if it is one of ``choices`` (compared with ``==``), else ``ValueError`` listing them."""
    choices = tuple(choices)
    try:
        known = value in choices
    except TypeError:  # unhashable or incomparable
        known = False
    if not known:
        raise ValueError(f"{name} must be one of {choices}; got {_shown(value)}")
    return value


def tensor(value, name: str, *, dim: int | None = None, shape: tuple | None = None, floating: bool = False,
           what: str | None = None) -> torch.Tensor:
    """``value`` if it is a ``torch.Tensor`` of the given ``dim``/``shape`` (and floating dtype).

    ``what`` describes the expected tensor in messages, e.g. ``"a 2-D tensor [out, in]"``.
    """
    if what is None:
        what = "a tensor" if dim is None else f"a {dim}-D tensor"
        if shape is not None:
            what = f"a tensor of shape {tuple(shape)}"
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be {what}; got {_shown(value)}")
    if dim is not None and value.dim() != dim:
        raise ValueError(f"{name} must be {what}; got shape {tuple(value.shape)}")
    if shape is not None and tuple(value.shape) != tuple(shape):
        raise ValueError(f"{name} must be {what}; got shape {tuple(value.shape)}")
    if floating and not value.is_floating_point():
        raise ValueError(f"{name} must be {what} with a floating dtype; got dtype {value.dtype}")
    return value


def finite(value: torch.Tensor, name: str) -> torch.Tensor:
    """``value`` if it holds no NaN or infinity; else ``ValueError`` counting them."""
    bad = ~torch.isfinite(value)
    if bad.any():
        raise ValueError(f"{name} must be finite; got {int(bad.sum())} NaN/Inf entries of {value.numel()}")
    return value


def names(value, name: str) -> list[str] | None:
    """A list of names (strings): any iterable of ``str`` but a plain ``str`` itself, or None."""
    if value is None:
        return None
    if isinstance(value, str):
        raise TypeError(f"{name} must be a list of names, not a plain string (it would be read letter by "
                        f"letter); got {value!r}: pass [{value!r}]")
    if not isinstance(value, Iterable):
        raise TypeError(f"{name} must be a list of names (strings); got {_shown(value)}")
    items = list(value)
    for item in items:
        if not isinstance(item, str):
            raise TypeError(f"{name} must be a list of names (strings); got the entry {_shown(item)}")
    if not items:
        raise ValueError(f"{name} must name at least one layer (or be None for all); got {value!r}")
    return items


def parser_type(flag: str, check=real, **bounds):
    """An ``argparse`` ``type=`` function for the command-line number ``flag``, checked like an argument.

    The text is read as an ``int`` (``check`` is :func:`integer`) or a ``float`` (any other ``check``:
    :func:`real`, :func:`sparsity`), then checked by ``check(number, flag, **bounds)``; a failure becomes
    ``argparse.ArgumentTypeError`` with the checker's message, so ``--lr inf`` exits with "argument --lr:
    --lr must be a finite number in (0, inf); got inf" (``float("inf")`` parses; the check refuses it).
    """
    import argparse

    def parse(text: str):
        try:
            number = int(text) if check is integer else float(text)
        except ValueError:
            kind = "an integer" if check is integer else "a number"
            raise argparse.ArgumentTypeError(f"{flag} must be {kind}; got {text!r}") from None
        try:
            return check(number, flag, **bounds)
        except (TypeError, ValueError) as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    parse.__name__ = flag
    return parse
