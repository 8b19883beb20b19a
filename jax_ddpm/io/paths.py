"""The one path layer: every file the project reads or writes goes through `etils.epath`.

A path may be local or an object-store URL (gs://bucket/...), the paths a Cloud TPU pod uses,
since its workers share no disk. orbax and TFDS use the same layer.

Writes are atomic for readers, so an interrupted write leaves the previous file, or none: a
local file is written beside its destination as `<path>.tmp` and renamed over it (atomic on
POSIX file systems); an object-store object is uploaded in one request and appears only once
complete (a rename there would be a copy and a delete, neither atomic nor needed).

Reads of user-named files check the file first and name the config key in every error:
missing, a directory, empty, not a zip archive (truncated), a pickled object array (refused;
nothing is ever unpickled), missing keys.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from collections.abc import Callable, Iterable
from typing import IO, Any

import fsspec
import numpy as np
from etils import epath

from jax_ddpm.io.errors import InputFileError, MissingInputError

# gs:// paths through gcsfs (etils.epath's fsspec backend) rather than TensorFlow's GCS client, for
# our files, orbax's and TFDS's alike. gcsfs honours STORAGE_EMULATOR_HOST, so the pod rehearsal
# (tests/pod_rehearsal_test.py) runs the very client a pod runs. epath reads the setting when it
# opens a path, and every module that touches files imports this one;
# EPATH_USE_TF=true in the environment keeps TensorFlow's client.
os.environ.setdefault("EPATH_USE_TF", "false")

PathLike = str | epath.Path


def _no_listing_cache() -> None:
  """gcsfs (epath's gs:// client) caches directory listings for the life of the process, so
  one worker would not see what another wrote (a checkpoint step, a sample batch). Off."""
  for protocol in ("gcs", "gs"):
    fsspec.config.conf.setdefault(protocol, {})["use_listings_cache"] = False


_no_listing_cache()


def as_path(path: PathLike) -> epath.Path:
  """An epath.Path; a relative local path is made absolute (orbax requires that)."""
  path = epath.Path(path)
  return path if is_object_store(path) else path.expanduser().absolute()


def join(*parts: PathLike) -> str:
  """The parts joined into one path string (local or URL)."""
  return str(epath.Path(parts[0]).joinpath(*[str(p) for p in parts[1:]]))


def exists(path: PathLike) -> bool:
  return epath.Path(path).exists()


def is_dir(path: PathLike) -> bool:
  return epath.Path(path).is_dir()


def list_names(directory: PathLike) -> list[str]:
  """Names of the entries of `directory`, sorted; [] when it does not exist."""
  directory = epath.Path(directory)
  return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def is_object_store(path: PathLike) -> bool:
  """True for URLs such as gs://bucket/...; False for local paths."""
  return "://" in str(path)


def write_atomically(path: PathLike, write: Callable[[IO], Any], binary: bool = True) -> None:
  """Calls write(f) so that readers see the old file or the whole new one (parents created)."""
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  if is_object_store(path):
    with path.open("wb" if binary else "w") as f:
      write(f)
    return
  temporary = path.with_name(path.name + ".tmp")
  with temporary.open("wb" if binary else "w") as f:
    write(f)
  temporary.replace(path)


def save_npz(path: PathLike, **arrays: np.ndarray) -> None:
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)  # in memory first: object-store files do not support seeking
  write_atomically(path, lambda f: f.write(buffer.getvalue()))


def save_json(path: PathLike, value: Any) -> None:
  write_atomically(path, lambda f: json.dump(value, f, indent=1), binary=False)


def load_json(path: PathLike) -> Any:
  return json.loads(epath.Path(path).read_text())


def save_bytes(path: PathLike, data: bytes) -> None:
  write_atomically(path, lambda f: f.write(data))


def save_png(path: str, image: np.ndarray) -> None:
  """Writes a uint8 [H, W, C] image (C = 1 or 3) as PNG (local path or URL), atomically."""
  from PIL import Image  # noqa: PLC0415 (pillow only where PNGs are written)

  buffer = io.BytesIO()
  Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, format="PNG")
  save_bytes(path, buffer.getvalue())


def append_bytes(path: PathLike, data: bytes) -> None:
  """Appends to a local file (parents created); object stores have no append."""
  if is_object_store(path):
    raise ValueError(f"{path}: object stores cannot append; rewrite the object instead.")
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with path.open("ab") as f:
    f.write(data)


def require_file(path: PathLike, what: str, hint: str = "") -> epath.Path:
  """`path` as an epath.Path, or an error naming `what` when it is no non-empty file."""
  path = epath.Path(path)
  if not path.exists():
    raise MissingInputError(f"{what}={str(path)!r} does not exist.{' ' + hint if hint else ''}")
  if path.is_dir():
    raise InputFileError(f"{what}={str(path)!r} is a directory; a file is needed.")
  if path.stat().length == 0:
    raise InputFileError(f"{what}={str(path)!r} is empty.")
  return path


def require_dir(path: PathLike, what: str) -> epath.Path:
  """`path` as an epath.Path, or an error naming `what` when it is no directory."""
  path = epath.Path(path)
  if not path.exists():
    raise MissingInputError(f"{what}={str(path)!r} does not exist.")
  if not path.is_dir():
    raise InputFileError(f"{what}={str(path)!r} is a file; a directory is needed.")
  return path


def read_npz(
  path: PathLike, what: str, keys: Iterable[str] | None = None, hint: str = ""
) -> dict[str, np.ndarray]:
  """Every array of an `.npz` file (or those in `keys`, which must be present), unpickled never.

  Errors name `what` (the config key or flag) and the file: missing, a directory, empty, not an
  npz archive (e.g. truncated), an object array (refused: loading it would unpickle), a key
  missing.
  """
  path = require_file(path, what, hint)
  data = path.read_bytes()
  if not data.startswith(b"PK"):
    raise InputFileError(
      f"{what}={str(path)!r} is not an .npz archive (a zip file, as np.savez writes)."
    )
  try:
    with np.load(io.BytesIO(data), allow_pickle=False) as archive:
      names = archive.files
      missing = [k for k in (keys or ()) if k not in names]
      if missing:
        raise InputFileError(f"{what}={str(path)!r} has no {missing} array (it has {names}).")
      return {name: archive[name] for name in (keys or names)}
  except InputFileError:
    raise
  except ValueError as error:  # numpy refuses object arrays when allow_pickle=False
    if "allow_pickle" in str(error):
      raise InputFileError(
        f"{what}={str(path)!r} holds a pickled object array; such files are "
        "refused, since loading one runs code. Save plain numeric arrays "
        "(np.savez)."
      ) from None
    raise InputFileError(f"{what}={str(path)!r} is not a readable .npz archive: {error}") from None
  except (zipfile.BadZipFile, OSError, EOFError, KeyError) as error:
    raise InputFileError(
      f"{what}={str(path)!r} is not a readable .npz archive (truncated or "
      f"another format): {type(error).__name__}: {error}"
    ) from None
