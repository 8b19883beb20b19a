"""The configs shipped with jax_ddpm, found by name from anywhere: `--config=mnist`.

An installed package carries them as jax_ddpm/configs/ (pyproject.toml maps configs/ there); in a
checkout they are the files of configs/ beside the package. A config is always loaded from
its file, so `--config=configs/mnist.py` (a path) and `--config=mnist` (a name) give the same run.
"""

from __future__ import annotations

import importlib.util
import os

from jax_ddpm.io.errors import MissingInputError

PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIRECTORIES = (
  os.path.join(PACKAGE, "configs"),  # an installed package
  os.path.join(os.path.dirname(PACKAGE), "configs"),
)  # a checkout


def directory() -> str:
  """The folder of the shipped configs."""
  for candidate in DIRECTORIES:
    if os.path.isfile(os.path.join(candidate, "default.py")):
      return candidate
  raise MissingInputError(f"No shipped configs in {list(DIRECTORIES)}; reinstall jax_ddpm.")


def names() -> list[str]:
  """The names of the shipped configs (mnist, cifar10, ...), default excluded."""
  return sorted(
    name[:-3]
    for name in os.listdir(directory())
    if name.endswith(".py") and name not in ("__init__.py", "default.py")
  )


def resolve(config: str) -> str:
  """A config file's path: `config` itself if it is a file or ends in .py, else the shipped
  config of that name."""
  if config.endswith(".py") or os.path.sep in config or os.path.isfile(config):
    return config
  path = os.path.join(directory(), config + ".py")
  if not os.path.isfile(path):
    raise MissingInputError(
      f"--config={config!r} is neither a file nor a shipped config; shipped: {names()}."
    )
  return path


def module(name: str):
  """The shipped config module `name` (or the config file at a path), loaded from its file
  (configs build on each other: mnist_cond.py on mnist.py, every one on default.py)."""
  path = resolve(name)
  stem = os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(f"jax_ddpm_config_{stem}", path)
  loaded = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(loaded)
  return loaded


def load(name: str):
  """The ConfigDict of a shipped config (or of a config file's path)."""
  return module(name).get_config()
