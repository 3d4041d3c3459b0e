"""Argument checks shared by the Python front ends (`Engine`, `sim.simulate`), so that a bad value
is a ValueError naming the argument rather than a conversion error from the binding."""

from __future__ import annotations

import math
import numbers
import time
from typing import Collection, Dict, List, Optional


def optional_positive_int(value: object, name: str) -> Optional[int]:
    """`value` if it is None or an int of at least 1 (not a bool); a ValueError naming `name` otherwise."""
    if value is None:
        return None
    if not is_int(value) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def field_error(message: str, param: str, kind: type = ValueError) -> ValueError:
    """A ValueError (or `kind`, a TypeError for a value of the wrong type) that names the request
    field at fault as `param`, as the core's refusals do (the server answers it as a 400 with that
    `param`)."""
    e = kind(message)
    e.param = param
    return e


def is_int(value: object) -> bool:
    """An integer, numpy's included (a value read from an array of settings), not a bool: the one
    rule for every count, seed and token id the front ends check."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """A real number, numpy's included, not a bool: the rule for every value in seconds or a
    sampling setting."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def token_ids(value: object, name: str) -> List[int]:
    """`value` as a list of ints: a list or tuple of integers (numpy's too) or a 1-D numpy array of
    them, as a tokenizer returns them; a TypeError naming `name` otherwise. The core checks that
    each is in the vocabulary."""
    items = value.tolist() if getattr(value, "ndim", None) == 1 and hasattr(value, "tolist") else value
    if not isinstance(items, (list, tuple)) or not all(is_int(t) for t in items):
        raise TypeError(f"{name} must be a list of integers, got {value!r}")
    return [int(t) for t in items]


def logit_bias_dict(value: object, name: str = "logit_bias") -> Optional[Dict[int, float]]:
    """`value` if it is None or a dict of token ids (integers, numpy's too) to numbers, as vLLM's
    `SamplingParams.logit_bias`; a TypeError naming `name` otherwise. The core checks that each id
    is in the vocabulary and each bias in [-100, 100]."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise TypeError(f"{name} must be a dict of token ids to biases, got {value!r}")
    for k, v in value.items():
        if not is_int(k) or not -2**63 <= k < 2**63 or not is_number(v):
            raise TypeError(f"{name} maps a token id (an integer) to a bias (a number), got {k!r}: {v!r}")
    return {int(k): float(v) for k, v in value.items()}


def unsigned_ints(values: dict, optional: Collection[str] = ()) -> None:
    """Each of `values` (argument name -> value) an integer from 0 to 2^64 - 1 (numpy's too, not a
    bool), or None where its name is in `optional`: what the binding takes as unsigned. Anything
    else would fail there with a bare conversion error that names no argument; the core checks the
    values themselves. A TypeError or ValueError naming the argument."""
    for name, value in values.items():
        if value is None and name in optional:
            continue
        if not is_int(value):
            raise TypeError(f"{name} must be an integer{' or None' if name in optional else ''}, got {value!r}")
        if not 0 <= int(value) < 2**64:
            raise ValueError(f"{name} must be a whole number >= 0 (below 2^64), got {value}")


def names(values: dict) -> None:
    """Each of `values` (argument name -> value) a string, as the options chosen by name (dtype,
    kv_cache_dtype, device) are: the binding would refuse anything else with a TypeError that
    names no argument. The core checks the name itself."""
    for name, value in values.items():
        if not isinstance(value, str):
            raise TypeError(f"{name} must be a string such as 'auto', got {value!r}")


def slo_dict(value: object, name: str = "slo") -> Optional[dict]:
    """`value` if it is None or a dict of names to numbers of seconds (not bools), for the core,
    which checks the names and that each is positive; a ValueError naming `name` otherwise."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be a dict like {{'ttft': 1.0, 'max_itl': 0.2, 'e2e': 300}}, got {value!r}")
    for k, v in value.items():
        if not isinstance(k, str) or not is_number(v):
            raise ValueError(f"{name} maps a bound's name to seconds, got {k!r}: {v!r}")
    return {k: float(v) for k, v in value.items()}


def waited_since(arrival_time: object) -> float:
    """Seconds since `arrival_time` (`time.time()` of a request's first arrival; None: now), never
    below 0 (another host's clock may run a little ahead); a ValueError for anything but a finite
    number of seconds."""
    if arrival_time is None:
        return 0.0
    if not is_number(arrival_time) or not math.isfinite(arrival_time):
        raise ValueError(f"arrival_time must be a finite number of seconds (time.time()), got {arrival_time!r}")
    return max(0.0, time.time() - float(arrival_time))
