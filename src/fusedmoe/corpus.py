"""The training data: the text the package ships, as byte-level tokens.

The corpus is ``fusedmoe/data/*.txt`` (no download), read byte by byte, so the
vocabulary is the 256 byte values. The batch of a training step is a pure
function of ``(seed, step)`` (:func:`batch_at`): the batch of step ``s`` is drawn
from ``numpy.random.default_rng([seed, s])``, so a resumed run sees the same
batches as one that was never stopped.
"""

from __future__ import annotations

from importlib import resources

import numpy as np

_CORPUS: np.ndarray | None = None


def corpus() -> np.ndarray:
    """The shipped text as a ``uint8`` array (files in name order, blank line between)."""
    global _CORPUS
    if _CORPUS is None:
        files = sorted(
            (f for f in resources.files("fusedmoe").joinpath("data").iterdir()
             if f.name.endswith(".txt")),
            key=lambda f: f.name,
        )
        if not files:
            raise FileNotFoundError("fusedmoe/data/*.txt: no training text shipped")
        data = b"\n\n".join(f.read_bytes() for f in files)
        _CORPUS = np.frombuffer(data, dtype=np.uint8)
    return _CORPUS


def batch_at(seed: int, step: int, batch_size: int, seq_len: int,
             data: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(inputs, targets)``, each ``[batch_size, seq_len]`` int32: a pure function of
    ``(seed, step)`` — the random windows of the corpus step ``step`` trains on."""
    data = corpus() if data is None else data
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, len(data) - seq_len - 1, size=batch_size)
    windows = data[starts[:, None] + np.arange(seq_len + 1)].astype(np.int32)
    return windows[:, :-1], windows[:, 1:]
