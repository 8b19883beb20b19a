"""Orbax checkpoints of the TrainState, with a JSON record of the run beside each.

The JSON ("meta", config/builders.py's `metadata`) lets a run refuse, before any compile, a
workdir whose checkpoints belong to another model, and lets `jax_ddpm.load` rebuild the network
from a workdir alone. Saves are asynchronous; call
`wait_until_finished` before reading them back or exiting.

A state's optional fields (None unless a run needs them, e.g. TrainState.timestep_history) are
left out of the saved tree when None, so a checkpoint holds the fields its run had. Restoring
reads the fields on disk: an optional field the target wants but the checkpoint lacks starts
from zeros (the field's empty value), and one on disk that the target does not want is dropped.
Checkpoints written before a field existed, or by a run without the option, thus stay readable.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from jax_ddpm.io import errors
from jax_ddpm.io import paths as files
from jax_ddpm.models import autoencoder as autoencoder_lib
from jax_ddpm.runtime import mesh as mesh_lib
from jax_ddpm.training import state as state_lib

if TYPE_CHECKING:
  from jax_ddpm.config.builders import Run


UnreadableCheckpointError = errors.UnreadableCheckpointError  # raised by restores
# The sections of a checkpoint's record that must match the run that reads it.
ARCHITECTURE_SECTIONS = ("model", "diffusion", "text", "autoencoder")


class IncompatibleCheckpointError(errors.UserInputError):
  """The workdir holds checkpoints of a different model or diffusion process."""


class Checkpointer:
  """A CheckpointManager under `<workdir>/checkpoints` keeping the newest `keep` steps.

  With create=False (readers) the directory must exist and nothing is created.
  """

  def __init__(self, workdir: str, keep: int = 3, create: bool = True):
    self.directory = str(files.as_path(workdir) / "checkpoints")
    self._manager = ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=create, enable_async_checkpointing=True
      ),
      # Named handlers let a reader see what a checkpoint holds before restoring it.
      item_handlers={"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()},
    )

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def read_meta(self, step: int) -> dict:
    restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(restored["meta"])

  def check_compatible(self, step: int, meta: dict, what: str = "--workdir") -> None:
    """Raises IncompatibleCheckpointError naming every architecture key that differs (the
    records' model, diffusion, text and autoencoder sections); `what` names the directory's
    key in the message.

    Checks the newest checkpoint at or before `step` whose record can be read; damaged ones
    are left to `restore_latest`.
    """
    for candidate in sorted((s for s in self.all_steps() if s <= step), reverse=True):
      try:
        saved = self.read_meta(candidate)
      except Exception:
        continue
      step = candidate
      break
    else:
      return
    differences = []
    for section in ARCHITECTURE_SECTIONS:
      ours, theirs = meta.get(section, {}), saved.get(section, {})
      for key in sorted(set(ours) | set(theirs)):
        if _normalise(ours.get(key)) != _normalise(theirs.get(key)):
          differences.append(
            f"{section}.{key}: config {ours.get(key)!r} vs checkpoint {theirs.get(key)!r}"
          )
    if differences:
      raise IncompatibleCheckpointError(
        f"{self.directory} holds checkpoints (latest step {step}) of a different model:\n  "
        + "\n  ".join(differences)
        + f"\nUse another {what}, or the config these checkpoints were trained with. "
        "Nothing was written."
      )

  def save(self, step: int, state: Any, meta: dict) -> None:
    self._manager.save(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(_saved(state)), meta=ocp.args.JsonSave(meta)
      ),
    )

  def restore(self, step: int, target: Any) -> Any:
    """The state saved at `step`, restored onto the shapes, dtypes and shardings of `target`
    (a dataclass of arrays or ShapeDtypeStructs); see the module's note on optional fields."""
    on_disk = self._manager.item_metadata(step)["state"]
    on_disk = getattr(on_disk, "tree", on_disk)
    wanted = {f.name: getattr(target, f.name) for f in dataclasses.fields(target)}
    missing = [name for name, value in wanted.items() if value is not None and name not in on_disk]
    optional = {f.name for f in dataclasses.fields(target) if f.default is None}
    if set(missing) - optional:  # not an optional field: a damaged or foreign checkpoint
      raise ValueError(f"The checkpoint has no {sorted(set(missing) - optional)}.")
    restore_target = {
      name: value for name, value in wanted.items() if value is not None and name in on_disk
    }
    sharding = _any_sharding(target)
    for name in set(on_disk) - set(restore_target):  # saved, but not wanted: read and drop
      restore_target[name] = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding),
        on_disk[name],
        is_leaf=lambda m: hasattr(m, "shape"),
      )
    restored = self._manager.restore(
      step, args=ocp.args.Composite(state=ocp.args.StandardRestore(restore_target))
    )["state"]
    fields = {name: restored.get(name) for name, value in wanted.items() if value is not None}
    for name in missing:
      logging.info("The checkpoint of step %d has no %s: it starts empty.", step, name)
      fields[name] = jax.tree.map(
        lambda x: jax.device_put(np.zeros(x.shape, x.dtype), x.sharding), wanted[name]
      )
    return target.replace(**fields)

  def restore_latest(self, target: Any, fallback: bool = False) -> tuple[Any, int]:
    """(state, step) of the newest readable checkpoint.

    An unreadable checkpoint (truncated or missing files) raises UnreadableCheckpointError
    naming its step, unless `fallback`: then it is moved to `checkpoints_unreadable/<step>`
    beside the checkpoint directory (kept, not deleted) and the previous one is tried.
    """
    for step in sorted(self.all_steps(), reverse=True):
      try:
        return self.restore(step, target), step
      except Exception as error:  # orbax and tensorstore raise many types for damaged files
        message = (
          f"The checkpoint of step {step} in {self.directory} cannot be read: "
          f"{type(error).__name__}: {str(error)[:500]}"
        )
        if not fallback:
          raise UnreadableCheckpointError(
            message + "\nPass --config.training.restore_fallback=True to set it aside and "
            "resume from the previous checkpoint."
          ) from error
        logging.warning("%s\nSetting it aside and trying the previous checkpoint.", message)
        self._set_aside(step)
    raise UnreadableCheckpointError(f"No readable checkpoint in {self.directory}.")

  def _set_aside(self, step: int) -> None:
    aside = epath.Path(self.directory).parent / "checkpoints_unreadable"
    aside.mkdir(parents=True, exist_ok=True)
    (epath.Path(self.directory) / str(step)).rename(aside / str(step))
    self._manager.reload()

  def wait_until_finished(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


def _saved(state: Any) -> Any:
  """The tree written for a dataclass state: its fields by name, optional ones only when set."""
  if not dataclasses.is_dataclass(state):
    return state
  return {
    f.name: getattr(state, f.name)
    for f in dataclasses.fields(state)
    if getattr(state, f.name) is not None
  }


def _any_sharding(target: Any):
  """A sharding of the target's arrays (all replicated over one mesh) for fields to drop."""
  return jax.tree.leaves(target)[0].sharding


def _normalise(value):
  """JSON turns tuples into lists; compare them alike."""
  if isinstance(value, (list, tuple)):
    return [_normalise(v) for v in value]
  return value


def load_checkpoint(run: Run, workdir: str, step: int | None = None):
  """(eval-mode graphdef, TrainState, step) of a workdir's checkpoint, latest unless `step`.

  Fails, before anything is compiled or written, when the workdir has no checkpoint, lacks
  `step`, or holds another model than `run`'s.
  """
  checkpointer, steps = _reader(workdir)
  directory = checkpointer.directory
  try:
    if step is None:
      step = max(steps)
    elif step not in steps:
      raise errors.ConfigError(
        f"No checkpoint of step {step} (--step) in {directory}; available: {sorted(steps)}."
      )
    checkpointer.check_compatible(step, run.metadata)
    mesh = mesh_lib.data_mesh()
    _, eval_graphdef, abstract = state_lib.abstract_train_state(
      run.network, run.config.seed, mesh, run.optimizer
    )
    try:
      restored = checkpointer.restore(step, abstract)
    except Exception as error:  # orbax and tensorstore raise many types for damaged files
      earlier = sorted(s for s in steps if s < step)
      raise UnreadableCheckpointError(
        f"The checkpoint of step {step} in {directory} cannot be read: "
        f"{type(error).__name__}: {str(error)[:500]}\nEarlier checkpoints (choose one with "
        f"--step): {earlier}."
      ) from error
  finally:
    checkpointer.close()
  return eval_graphdef, restored, step


def read_saved_config(workdir: str, step: int | None = None) -> tuple[dict, int]:
  """(the run config saved beside a checkpoint, as nested dicts; its step), latest unless
  `step`: what a workdir was trained with."""
  checkpointer, steps = _reader(workdir)
  try:
    step = max(steps) if step is None else step
    if step not in steps:
      raise errors.ConfigError(
        f"No checkpoint of step {step} in {checkpointer.directory}; available: {sorted(steps)}."
      )
    meta = checkpointer.read_meta(step)
  finally:
    checkpointer.close()
  if "config" not in meta:
    raise errors.InputFileError(
      f"The checkpoint of step {step} in {checkpointer.directory} "
      "records no run config; pass the config it was trained with."
    )
  return meta["config"], step


def _reader(workdir: str) -> tuple[Checkpointer, list[int]]:
  """A reading Checkpointer of `workdir` and its steps; MissingInputError when it has none."""
  directory = files.join(files.as_path(workdir), "checkpoints")
  checkpointer = Checkpointer(workdir, create=False) if files.is_dir(directory) else None
  steps = checkpointer.all_steps() if checkpointer else []
  if not steps:
    if checkpointer:
      checkpointer.close()
    raise errors.MissingInputError(
      f"No checkpoint in {directory}: train first (--mode=train) or import weights (--mode=import)."
    )
  return checkpointer, steps


def save_imported(run: Run, workdir: str, params) -> int:
  """Writes imported weights as the step-0 checkpoint of an empty `workdir`; returns 0.

  Params and EMA params both take them, so sampling and fine-tuning start from them. A workdir
  that already holds checkpoints is refused, and nothing is written.
  """
  existing = files.join(workdir, "checkpoints")
  if files.list_names(existing):
    raise errors.ConfigError(
      f"{existing} already holds checkpoints; import into an empty --workdir. Nothing was written."
    )
  mesh = mesh_lib.data_mesh()
  _, _, state = state_lib.create_train_state(run.network, run.config.seed, mesh, run.optimizer)
  params = jax.device_put(params, mesh_lib.replicated(mesh))
  state = state.replace(
    params=params, ema_params=params, opt_state=jax.jit(run.optimizer.init)(params)
  )
  checkpointer = Checkpointer(workdir, keep=run.config.training.keep_checkpoints)
  checkpointer.save(0, state, run.metadata)
  checkpointer.close()  # waits for the save
  return 0


def autoencoder_record(network: autoencoder_lib.AutoencoderConfig) -> dict:
  """The architecture an autoencoder checkpoint records and a reader checks (kl_weight, a
  training choice, left out: the weights read the same without it)."""
  record = dataclasses.asdict(network)
  record.pop("kl_weight")
  return record


def load_codec(directory: str, network: autoencoder_lib.AutoencoderConfig) -> autoencoder_lib.Codec:
  """The newest checkpoint of the autoencoder workdir `directory` (autoencoder.checkpoint), with
  the scale factor saved beside it; fails naming the key when there is none, or when it holds
  another network than `network`."""
  hint = "train it first: --mode=train_autoencoder --workdir=<that directory>"
  if not files.is_dir(files.join(files.as_path(directory), "checkpoints")):
    raise errors.MissingInputError(
      f"autoencoder.checkpoint={directory!r} holds no checkpoint (no checkpoints/ in it): {hint}."
    )
  checkpointer = Checkpointer(directory, create=False)
  try:
    steps = checkpointer.all_steps()
    if not steps:
      raise errors.MissingInputError(
        f"autoencoder.checkpoint={directory!r} has no checkpoint yet: {hint}."
      )
    meta = checkpointer.read_meta(max(steps))
    if "autoencoder" not in meta or meta.get("scale_factor") is None:
      raise IncompatibleCheckpointError(
        f"autoencoder.checkpoint={directory!r} holds checkpoints of another kind (no "
        "autoencoder and scale factor in their record): point it at a workdir of "
        "--mode=train_autoencoder."
      )
    record = {"autoencoder": autoencoder_record(network)}
    checkpointer.check_compatible(max(steps), record, what="autoencoder.checkpoint")
    graphdef, target = state_lib.create_autoencoder_state(
      network, 0, optax.adam(1e-3), mesh_lib.data_mesh()
    )  # Adam's moments have the same shapes at any learning rate
    state, _ = checkpointer.restore_latest(target)
  finally:
    checkpointer.close()
  return autoencoder_lib.Codec(network, graphdef, state.params, float(meta["scale_factor"]))
