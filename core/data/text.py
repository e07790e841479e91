"""Character-level language modelling on the source of Python's own standard library."""

from __future__ import annotations

import os
import random
import sysconfig
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, TensorDataset

from .sampling import LitplugDataModule

__all__ = ["StdlibTextDataModule", "VOCAB", "encode", "decode", "stdlib_python_files", "load_stdlib_text"]

UNKNOWN_INDEX = 0
UNKNOWN_CHAR = "\ufffd"
# Fixed vocabulary (index 0 = unknown, then tab, newline, printable ASCII 32..126) so its size
# never depends on which files were selected.
VOCAB: str = "\t\n" + "".join(chr(c) for c in range(32, 127))
VOCAB_SIZE = len(VOCAB) + 1
# Code point -> index for ASCII; everything else maps to UNKNOWN_INDEX.
_ASCII_TABLE = np.full(128, UNKNOWN_INDEX, dtype=np.int64)
for _i, _ch in enumerate(VOCAB, start=1):
    _ASCII_TABLE[ord(_ch)] = _i
_DECODE_TABLE = UNKNOWN_CHAR + VOCAB
# Folders that are not the standard library proper, or are huge test data.
_SKIP_DIRS = frozenset({"test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__"})


def encode(text: str) -> Tensor:
    """Map characters to int64 vocabulary indices (unknown characters -> 0)."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
    ascii_codes = np.minimum(codes, 127)
    indices = np.where(codes < 128, _ASCII_TABLE[ascii_codes], UNKNOWN_INDEX)
    return torch.from_numpy(indices)


def decode(indices: Tensor | list[int]) -> str:
    """Map vocabulary indices back to text (unknown -> U+FFFD)."""
    values = indices.tolist() if isinstance(indices, Tensor) else indices
    return "".join(_DECODE_TABLE[i] for i in values)


@lru_cache(maxsize=1)
def stdlib_python_files() -> tuple[Path, ...]:
    """Sorted ``.py`` files of the standard library, without tests, idlelib and site-packages."""
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir() or not (root / "os.py").is_file():
        raise FileNotFoundError(
            f"Python standard library sources not found at {root!s} (sysconfig 'stdlib' path); "
            "StdlibTextDataModule needs the .py sources of the running interpreter"
        )
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]
        files.extend(Path(dirpath) / f for f in filenames if f.endswith(".py"))
    if not files:
        raise FileNotFoundError(f"no .py files found under the standard library path {root!s}")
    # Sorted relative paths make the seeded selection reproducible across filesystems.
    return tuple(sorted(files, key=lambda p: p.relative_to(root).as_posix()))


def _read_source(path: Path) -> str | None:
    """The file's text with normalised newlines, or None if it is not valid UTF-8."""
    try:
        text = path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    return text.replace("\r\n", "\n").replace("\r", "\n")


@lru_cache(maxsize=4)
def load_stdlib_text(seed: int = 0, num_files: int = 40, max_chars: int = 400_000) -> str:
    """Concatenated text of ``num_files`` seeded-chosen stdlib files, truncated to ``max_chars``.

    Files are shuffled (seeded) from the sorted list and the first ``num_files`` that decode as
    UTF-8 are used, each followed by a newline.
    """
    if num_files < 1:
        raise ValueError(f"num_files must be >= 1, got {num_files}")
    if max_chars < 1:
        raise ValueError(f"max_chars must be >= 1, got {max_chars}")
    files = list(stdlib_python_files())
    random.Random(seed).shuffle(files)
    parts: list[str] = []
    total = 0
    for path in files:
        if len(parts) == num_files or total >= max_chars:
            break
        text = _read_source(path)
        if text is None:
            continue
        parts.append(text + "\n")
        total += len(parts[-1])
    return "".join(parts)[:max_chars]


def _windows(tokens: Tensor, seq_len: int) -> tuple[Tensor, Tensor]:
    """Non-overlapping windows of ``seq_len + 1`` tokens -> (inputs [N, T], targets [N, T])."""
    num = len(tokens) // (seq_len + 1)
    windows = tokens[: num * (seq_len + 1)].reshape(num, seq_len + 1)
    return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()


class StdlibTextDataModule(LitplugDataModule):
    """Next-character prediction on standard-library ``.py`` text.

    The concatenated text is split into contiguous train/val/test chunks (in that order); each
    chunk is cut into non-overlapping windows of ``seq_len + 1`` characters giving
    ``(inputs int64 [T], targets int64 [T])`` with targets the inputs shifted by one.

    Args:
        seq_len: characters per example (T).
        batch_size: examples per batch per device.
        seed: seed of the file selection and of the training order.
        num_files: number of stdlib files to use.
        max_chars: cap on the total number of characters.
        val_fraction: fraction of the text for validation.
        test_fraction: fraction of the text for testing.
        num_workers, pin_memory, persistent_workers: the DataLoaders' worker options, as for
            :class:`LitplugDataModule`.
    """

    def __init__(
        self,
        seq_len: int = 64,
        batch_size: int = 32,
        seed: int = 0,
        num_files: int = 40,
        max_chars: int = 400_000,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
    ) -> None:
        super().__init__(batch_size, seed, num_workers, pin_memory, persistent_workers)
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        if num_files < 1:
            raise ValueError(f"num_files must be >= 1, got {num_files}")
        if max_chars < 1:
            raise ValueError(f"max_chars must be >= 1, got {max_chars}")
        for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0.0 < value < 1.0:
                raise ValueError(f"{name} must be in (0, 1), got {value!r}")
        if val_fraction + test_fraction >= 1.0:
            raise ValueError("val_fraction + test_fraction must be < 1")
        self.seq_len = seq_len
        self.num_files = num_files
        self.max_chars = max_chars
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.text = ""

    @property
    def vocab_size(self) -> int:
        return VOCAB_SIZE

    @property
    def num_classes(self) -> int:
        return VOCAB_SIZE

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (self.seq_len,)

    @staticmethod
    def encode(text: str) -> Tensor:
        """Characters -> int64 indices."""
        return encode(text)

    @staticmethod
    def decode(indices: Tensor | list[int]) -> str:
        """Indices -> characters."""
        return decode(indices)

    def setup(self, stage: str | None = None) -> None:
        """Load, encode and window the text once (idempotent)."""
        if self.datasets:
            return
        self.text = load_stdlib_text(self.seed, self.num_files, self.max_chars)
        tokens = encode(self.text)
        n = len(tokens)
        n_train = int(n * (1.0 - self.val_fraction - self.test_fraction))
        n_val = int(n * self.val_fraction)
        chunks = {
            "train": tokens[:n_train],
            "val": tokens[n_train : n_train + n_val],
            "test": tokens[n_train + n_val :],
        }
        datasets: dict[str, Dataset[Any]] = {}
        for name, chunk in chunks.items():
            inputs, targets = _windows(chunk, self.seq_len)
            if len(inputs) == 0:
                raise ValueError(
                    f"the {name} split has fewer than seq_len + 1 = {self.seq_len + 1} characters; "
                    "raise max_chars/num_files or lower seq_len"
                )
            datasets[name] = TensorDataset(inputs, targets)
        self.datasets = datasets
