"""Priors for Past-Future's length history: what it samples from before requests have finished.

A cold history holds ``history_prior_weight`` entries drawn from the prior, spread over its
quantiles; every finished request replaces one, so the prior fades as real lengths arrive. Choices:

- ``None`` or ``"uniform"`` (the default): uniform up to the largest allowed output, nothing known
  but the bound. While the history fills, running requests count as censored lengths ("at least
  what they generated"), so the first, short finishes do not make it admit too much.
- ``"max-tokens"``: every entry is the largest allowed output (LightLLM's priming): admits as
  conservative does until real lengths replace it.
- ``"sharegpt"``: a bundled distribution, 128 quantiles of the output lengths of 30,731 ShareGPT
  conversations (mean 439 tokens; source in ``SOURCES.md`` here).
- a path to a CSV file: one output length per row, either a single column or a column named
  ``output_len`` (a header line is optional).
- a sequence of positive ints.
"""

from __future__ import annotations

import csv
import operator
import os
from pathlib import Path
from typing import List, Sequence, Union

Prior = Union[None, str, os.PathLike, Sequence[int]]

BUNDLED = {"sharegpt": "sharegpt_output_lengths.csv"}

__all__ = ["SHAPES", "resolve_prior", "check_lengths", "read_lengths_csv", "BUNDLED", "Prior"]


def read_lengths_csv(path: Union[str, os.PathLike]) -> List[int]:
    """Output lengths from a CSV file (see the module's docstring); a clear ValueError otherwise."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"history prior file not found: {p}")
    with p.open(newline="") as f:
        rows = [r for r in csv.reader(f) if r and any(c.strip() for c in r)]
    if not rows:
        raise ValueError(f"history prior file {p} is empty")
    first = [c.strip() for c in rows[0]]
    has_header = not all(_is_int(c) for c in first)
    names = [c.lower() for c in first]
    if len(first) == 1:
        column = 0
    elif has_header and "output_len" in names:
        column = names.index("output_len")
    else:
        raise ValueError(f"history prior file {p} has several columns and none named output_len: {rows[0]}")
    body, start = (rows[1:], 2) if has_header else (rows, 1)
    lengths = []
    for line, r in enumerate(body, start=start):
        cell = r[column].strip() if column < len(r) else ""
        if not _is_int(cell) or int(cell) < 1:
            raise ValueError(f"history prior file {p}, row {line}: {cell!r} is not an output length (a positive integer)")
        lengths.append(int(cell))
    if not lengths:
        raise ValueError(f"history prior file {p} has a header but no lengths")
    return lengths


def _is_int(s: str) -> bool:
    return s.strip().lstrip("+-").isdigit()


#: Priors shaped by the largest allowed output, resolved in the core.
SHAPES = ("uniform", "max-tokens")


def resolve_prior(prior: Prior) -> Union[None, str, List[int]]:
    """The prior as the core takes it: None (the default), a shape's name, or lengths."""
    if prior is None:
        return None
    if isinstance(prior, (str, os.PathLike)):
        name = "max-tokens" if str(prior) == "max_tokens" else str(prior)
        if name in SHAPES:
            return name
        if name in BUNDLED:
            return read_lengths_csv(Path(__file__).parent / BUNDLED[name])
        if not Path(name).is_file():
            raise ValueError(
                f"history prior {name!r} is neither a bundled prior ({', '.join(BUNDLED)}), "
                f"{' nor '.join(SHAPES)}, nor a CSV file"
            )
        return read_lengths_csv(name)
    return check_lengths(prior, "history prior")


def check_lengths(values, what: str) -> List[int]:
    """`values` as a list of output lengths (integers of at least 1 token), or a ValueError
    naming `what`: the one check for a prior given as a list and for a saved history."""
    try:
        lengths = [operator.index(v) for v in values]  # ints and numpy ints; not floats or strings
    except TypeError:
        lengths = []
    if not lengths or min(lengths) < 1:
        raise ValueError(f"{what} must hold output lengths of at least 1 token (integers)")
    return lengths

