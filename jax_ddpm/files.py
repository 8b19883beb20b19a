"""Atomic file writes: a reader (or a resumed run) never sees a half-written file.

Each file is written beside its destination as `<path>.tmp` and renamed over it; the rename is
atomic on POSIX file systems, so an interrupted write leaves the previous file, or none.
"""

from __future__ import annotations

import json
import os
from typing import IO, Any, Callable

import numpy as np


def write_atomically(path: str, write: Callable[[IO], Any], binary: bool = True) -> None:
  """Calls write(f) on a temporary file, then renames it to `path` (parents created)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  temporary = path + ".tmp"
  with open(temporary, "wb" if binary else "w") as f:
    write(f)
  os.replace(temporary, path)


def save_npz(path: str, **arrays: np.ndarray) -> None:
  write_atomically(path, lambda f: np.savez(f, **arrays))


def save_json(path: str, value: Any) -> None:
  write_atomically(path, lambda f: json.dump(value, f, indent=1), binary=False)
