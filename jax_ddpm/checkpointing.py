"""Orbax checkpoints of the TrainState, with a JSON record of the architecture beside each.

The JSON ("meta") lets a run refuse, before any compile, a workdir whose checkpoints belong to
another model, and lets the sampling mode rebuild the network. Saves are asynchronous; call
`wait_until_finished` before reading them back or exiting.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import orbax.checkpoint as ocp


class IncompatibleCheckpointError(ValueError):
  """The workdir holds checkpoints of a different model or diffusion process."""


class Checkpointer:
  """A CheckpointManager under `<workdir>/checkpoints` keeping the newest `keep` steps.

  With create=False (readers) the directory must exist and nothing is created.
  """

  def __init__(self, workdir: str, keep: int = 3, create: bool = True):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=create,
                                             enable_async_checkpointing=True))

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def read_meta(self, step: int) -> dict:
    restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(restored["meta"])

  def check_compatible(self, step: int, meta: dict) -> None:
    """Raises IncompatibleCheckpointError naming every architecture key that differs."""
    saved = self.read_meta(step)
    differences = []
    for section in ("model", "diffusion"):
      ours, theirs = meta.get(section, {}), saved.get(section, {})
      for key in sorted(set(ours) | set(theirs)):
        if _normalise(ours.get(key)) != _normalise(theirs.get(key)):
          differences.append(f"{section}.{key}: config {ours.get(key)!r} vs checkpoint "
                             f"{theirs.get(key)!r}")
    if differences:
      raise IncompatibleCheckpointError(
          f"{self.directory} holds checkpoints (latest step {step}) of a different model:\n  "
          + "\n  ".join(differences)
          + "\nUse another --workdir, or the config these checkpoints were trained with. "
          "Nothing was written.")

  def save(self, step: int, state: Any, meta: dict) -> None:
    self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                     meta=ocp.args.JsonSave(meta)))

  def restore(self, step: int, target: Any) -> Any:
    """The state saved at `step`, restored onto the shapes, dtypes and shardings of `target`."""
    restored = self._manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
    return restored["state"]

  def wait_until_finished(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


def _normalise(value):
  """JSON turns tuples into lists; compare them alike."""
  if isinstance(value, (list, tuple)):
    return [_normalise(v) for v in value]
  return value
