"""The token ids a run trains on: the shipped text as bytes (the toy model's), the
shipped text through a ``tokenizer.json`` (a Hugging Face model's tokenizer),
or token ids read from a file.

==============================  ===============================================
``TrainConfig`` fields          token stream
==============================  ===============================================
neither                         ``fusedmoe/data/*.txt`` byte by byte (vocab 256)
``tokenizer``                   the same text, encoded with that ``tokenizer.json``
``data``                        the ids in that file (``.txt`` or ``.npy``)
==============================  ===============================================

An id file is either ``.npy`` (an integer array of any shape, read in order)
or ``.txt`` (integers separated by whitespace and/or commas, lines joined).
Batches are random windows of the one stream (:func:`fusedmoe.corpus.batch_at`).

A stream other than the bytes is fingerprinted (:func:`digest`: SHA-256 of the
ids as little-endian int32) and the digest kept in the run's config, so a run
resumed on a changed file or tokenizer is refused instead of continuing on
other data. Every problem is a ``ValueError`` that names the file.
"""

from __future__ import annotations

import hashlib
import os
import re
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from fusedmoe.train.config import TrainConfig

DATA_SUFFIXES = (".txt", ".npy")
_INT = re.compile(r"[+-]?\d+")


def read_token_ids(path: str) -> np.ndarray:
    """The token ids of a ``.txt`` or ``.npy`` file as ``[T]`` int32 (not yet
    checked against a vocabulary)."""
    if not os.path.isfile(path):
        what = "a directory" if os.path.isdir(path) else "no such file"
        raise ValueError(f"{path}: {what}; expected a file of token ids (.txt or .npy)")
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".npy":
        ids = _read_npy(path)
    elif suffix == ".txt":
        ids = _read_txt(path)
    else:
        raise ValueError(f"{path}: unknown suffix {suffix or '(none)'!r}; expected a .txt file "
                         "(integers separated by spaces, commas or newlines) or a .npy array")
    if ids.size == 0:
        raise ValueError(f"{path}: holds no token ids")
    if ids.min() < 0:
        raise ValueError(f"{path}: token id {int(ids.min())} is negative; expected ids >= 0")
    if ids.max() > np.iinfo(np.int32).max:
        raise ValueError(f"{path}: token id {int(ids.max())} does not fit in int32")
    return ids.astype(np.int32)


def _read_npy(path: str) -> np.ndarray:
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise ValueError(f"{path}: not a NumPy .npy array ({exc})") from None
    if not isinstance(array, np.ndarray) or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{path}: holds {getattr(array, 'dtype', type(array).__name__)} values; "
                         "expected integer token ids")
    return array.reshape(-1).astype(np.int64)


def _read_txt(path: str) -> np.ndarray:
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text; expected integer token ids") from None
    ids: list[int] = []
    for number, line in enumerate(lines, 1):
        for item in line.replace(",", " ").split():
            if not _INT.fullmatch(item):
                raise ValueError(f"{path}: line {number}: {item[:40]!r} is not a token id; "
                                 "expected integers separated by spaces, commas or newlines")
            ids.append(int(item))
    return np.asarray(ids, np.int64)


def tokenize_corpus(tokenizer_path: str) -> np.ndarray:
    """The shipped text (:func:`fusedmoe.corpus.corpus`) encoded with
    ``tokenizer_path`` (a ``tokenizer.json``), without special tokens, as ``[T]``
    int32."""
    from fusedmoe.corpus import corpus

    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise ValueError(f"{tokenizer_path}: reading it needs the `tokenizers` package (the hf "
                         "extra: pip install 'fusedmoe[hf]')") from None
    try:
        tokenizer = Tokenizer.from_file(tokenizer_path)
    except Exception as exc:  # tokenizers raises its own Exception type
        raise ValueError(f"{tokenizer_path}: not a tokenizers tokenizer.json ({exc})") from None
    tokenizer.no_truncation()  # a tokenizer.json may ask for both; the corpus is one text
    tokenizer.no_padding()
    text = corpus().tobytes().decode("utf-8", errors="replace")
    return np.asarray(tokenizer.encode(text, add_special_tokens=False).ids, np.int32)


def token_stream(*, tokenizer: str = "", data: str = "") -> np.ndarray:
    """The ``[T]`` int32 ids a run of these ``TrainConfig`` fields trains on (see
    the module docstring); ``data`` wins over ``tokenizer``."""
    if data:
        return read_token_ids(data)
    if tokenizer:
        return tokenize_corpus(tokenizer)
    from fusedmoe.corpus import corpus

    return corpus().astype(np.int32)


def check_stream(ids: np.ndarray, *, vocab_size: int, seq_len: int, source: str) -> None:
    """A ``ValueError`` naming ``source`` unless every id is below ``vocab_size``
    and the stream holds a window of ``seq_len + 1`` tokens with room to move."""
    top = int(ids.max())
    if top >= vocab_size:
        where = int(np.argmax(ids >= vocab_size))
        raise ValueError(f"{source}: token id {top} (first past the vocabulary at position "
                         f"{where}) is past the model's vocabulary of {vocab_size} tokens")
    if ids.size < seq_len + 2:
        raise ValueError(f"{source}: {ids.size} tokens; a training window of seq_len={seq_len} "
                         f"needs at least {seq_len + 2}")


def digest(ids: np.ndarray) -> str:
    """SHA-256 (hex) of ``ids`` as little-endian int32: the stream's fingerprint."""
    return hashlib.sha256(np.asarray(ids, "<i4").tobytes()).hexdigest()


def stream_for(config: TrainConfig) -> tuple[TrainConfig, np.ndarray]:
    """``(config, ids [T])``: the token stream a run of ``config`` trains on, checked
    against the model's vocabulary, the window length and the digest ``config``
    records (filled in when empty, for streams other than the shipped bytes)."""
    ids = token_stream(tokenizer=config.tokenizer, data=config.data)
    source = config.data or config.tokenizer or "the shipped text"
    check_stream(ids, vocab_size=config.model.vocab_size, seq_len=config.seq_len, source=source)
    if config.byte_level:
        return config, ids
    found = digest(ids)
    if config.data_sha256 and config.data_sha256 != found:
        raise ValueError(f"{source}: its token ids (sha256 {found[:12]}...) are not the ones "
                         f"the run was configured with (sha256 {config.data_sha256[:12]}...): "
                         "the file or the tokenizer changed")
    return config.replace(data_sha256=found), ids
