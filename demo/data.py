"""Text for the demo without any download, and a character-level next-token dataset over it.

``load_text()`` concatenates the Python standard library's own source files (always on disk where
Python runs, a few MB of real, structured text); ``load_text(path)`` reads the user's file.
``CharDataset`` maps characters to ids and samples (x, y) windows for next-character prediction.
"""
from __future__ import annotations

import os
import sysconfig
from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = ["CharDataset", "load_text", "DEFAULT_MAX_BYTES"]

DEFAULT_MAX_BYTES = 4 * 2**20


def _stdlib_sources(root: str):
    """Every ``*.py`` under the stdlib directory in a fixed order (sorted relative paths), skipping
    installed packages and test suites (site-packages is a venv's content, not the stdlib's)."""
    skip = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip and not d.startswith("."))
        for name in sorted(filenames):
            if name.endswith(".py"):
                yield os.path.join(dirpath, name)


def load_text(path: Optional[str] = None, max_bytes: int = DEFAULT_MAX_BYTES) -> str:
    """The demo corpus as one string.

    Args:
        path: a UTF-8 text file to read whole; ``None`` = the standard library's Python sources,
            concatenated in sorted path order, each preceded by a ``# file: <relative path>`` line,
            stopping before the file that would pass ``max_bytes`` (so the result is deterministic
            for a given Python installation, and never cuts a file in the middle).
        max_bytes: cap (UTF-8 bytes) of the default corpus; ignored for ``path``.
    """
    if path is not None:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        if not text:
            raise ValueError(f"load_text: {path!r} is empty")
        return text
    if max_bytes < 1:
        raise ValueError(f"load_text: max_bytes must be >= 1, got {max_bytes}")
    root = sysconfig.get_paths()["stdlib"]
    parts, size = [], 0
    for file in _stdlib_sources(root):
        try:
            with open(file, encoding="utf-8") as f:
                body = f.read()
        except (UnicodeDecodeError, OSError):
            continue  # a few stdlib files are latin-1 test fixtures or unreadable: not worth decoding
        chunk = f"# file: {os.path.relpath(file, root)}\n{body}\n"
        n = len(chunk.encode("utf-8"))
        if size + n > max_bytes:
            if parts:
                break
            continue  # even the first file is too big for the cap: try a smaller one
        parts.append(chunk)
        size += n
    if not parts:
        raise RuntimeError(f"load_text: no readable .py file under {root!r} fits in {max_bytes} bytes")
    return "".join(parts)


class CharDataset:
    """Character-level tokens of ``text``: vocab = its sorted distinct characters.

    ``data`` is the whole text as an int64 tensor of ids (N,). ``batch(B, T, generator)`` draws B
    random windows: x = data[i : i + T], y = data[i + 1 : i + T + 1], both (B, T) int64.
    """

    def __init__(self, text: str) -> None:
        if not isinstance(text, str):
            raise TypeError(f"CharDataset: text must be a str, got {type(text).__name__}")
        if len(text) < 2:
            raise ValueError(f"CharDataset: text needs at least 2 characters, got {len(text)}")
        self.chars = sorted(set(text))
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        self._codes = torch.tensor([ord(c) for c in self.chars], dtype=torch.int64)
        self._max_code = int(self._codes.max())
        self.data = self.encode(text)

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def __len__(self) -> int:
        return self.data.numel()

    def encode(self, text: str) -> Tensor:
        """str -> (len(text),) int64 ids; a character outside the vocab raises KeyError naming it."""
        if not text:
            return torch.empty(0, dtype=torch.int64)
        # Code points via UTF-32, then one table lookup: a few MB encode in milliseconds.
        codes = torch.frombuffer(bytearray(text.encode("utf-32-le")), dtype=torch.int32).long()
        table = torch.full((max(int(codes.max()), self._max_code) + 1,), -1, dtype=torch.int64)
        table[self._codes] = torch.arange(len(self.chars))
        ids = table[codes]
        if bool((ids < 0).any()):
            bad = text[int((ids < 0).nonzero()[0, 0])]
            raise KeyError(f"CharDataset.encode: character {bad!r} is not in the vocabulary")
        return ids

    def decode(self, ids) -> str:
        """(N,) ids (tensor or sequence of ints) -> str."""
        if isinstance(ids, Tensor):
            ids = ids.reshape(-1).tolist()
        return "".join(self.chars[i] for i in ids)

    def batch(self, B: int, T: int, generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Tensor]:
        """(x, y), each (B, T) int64, y shifted one character right of x; windows start uniformly
        at random (from ``generator``) among the N - T valid starts."""
        for name, v in (("B", B), ("T", T)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"CharDataset.batch: {name} must be an int >= 1, got {v!r}")
        n = self.data.numel()
        if T >= n:
            raise ValueError(f"CharDataset.batch: T={T} needs a text longer than T (got {n} characters)")
        starts = torch.randint(0, n - T, (B,), generator=generator)
        idx = starts[:, None] + torch.arange(T + 1)
        chunk = self.data[idx]
        return chunk[:, :-1], chunk[:, 1:]
