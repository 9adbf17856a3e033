"""Integer seeds from a ``random_state`` parameter, and random streams derived from a seed.

One place for the three ways the package turns scikit-learn's
``random_state`` (None, an int or a ``RandomState`` instance) into seeds:

- :func:`draw_seeds`: ints drawn from ``check_random_state(random_state)``
  (:class:`~skpatchcore.CoresetSampler`'s ``seed_``);
- :func:`int_seeds`: an int as it is, else drawn (the torch seed of a
  randomly initialised backbone, the steps of
  :func:`~skpatchcore.make_patchcore`);
- :func:`derived_rng`: an independent, reproducible stream for a seed and
  a few keys (the chunks of a chunked coreset, wherever they run).
"""

from __future__ import annotations

import numbers

import numpy as np
from sklearn.utils import check_random_state

#: Seeds are drawn in [0, SEED_LIMIT): valid for numpy and for torch.
SEED_LIMIT = np.iinfo(np.int32).max


def draw_seeds(random_state, n_seeds: int) -> list[int]:
    """`n_seeds` int seeds drawn from ``check_random_state(random_state)`` (fresh entropy when None).

    Examples
    --------
    >>> from skpatchcore._random_seeds import draw_seeds
    >>> draw_seeds(0, 2) == draw_seeds(0, 2)
    True
    """
    return [int(seed) for seed in check_random_state(random_state).randint(SEED_LIMIT, size=n_seeds)]


def int_seeds(random_state, n_seeds: int) -> list[int]:
    """An int `random_state` `n_seeds` times as it is, else `n_seeds` seeds drawn from it.

    An int passes through unchanged so that results recorded with it stay
    reproducible; a ``RandomState`` instance gives independent seeds.

    Examples
    --------
    >>> from skpatchcore._random_seeds import int_seeds
    >>> int_seeds(7, 3)
    [7, 7, 7]
    """
    if isinstance(random_state, numbers.Integral):
        return [int(random_state)] * n_seeds
    return draw_seeds(random_state, n_seeds)


def derived_rng(seed: int, *keys: int) -> np.random.RandomState:
    """An independent random stream for (`seed`, `keys`): same keys, same stream."""
    state = np.random.SeedSequence([int(seed), *(int(key) for key in keys)]).generate_state(1)[0]
    return np.random.RandomState(int(state))
