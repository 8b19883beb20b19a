"""Non-finite guards and damaged checkpoints.

Kills at random moments are in preemption_test.py; two processes through jax.distributed, on
a gs:// workdir, in pod_rehearsal_test.py.
"""

import glob
import os
import shutil

import jax
import numpy as np
import pytest
import runs

from configs import tiny
from jax_ddpm.training import checkpointing


def nan_config(policy, steps=6):
  config = tiny.get_config()
  config.training.num_train_steps = steps
  config.training.nonfinite_policy = policy
  config.debug.inject_nonfinite_at_steps = (4,)
  return config


def test_halt_policy_stops_at_the_bad_step_and_keeps_the_last_checkpoint(tmp_path):
  with pytest.raises(
    FloatingPointError,
    match=r"Non-finite loss or gradient at step 4 .*last checkpoint, step 3, "
    r"is kept",
  ):
    runs.train(nan_config("halt"), str(tmp_path))
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["3"]


def test_skip_policy_withholds_the_bad_update_and_counts_it(tmp_path):
  final = runs.train(nan_config("skip"), str(tmp_path))
  assert int(final.step) == 6 and int(final.nonfinite_steps) == 1
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(final.params)))
  from tensorboard.backend.event_processing import event_accumulator
  from tensorboard.util import tensor_util

  accumulator = event_accumulator.EventAccumulator(str(tmp_path), size_guidance={"tensors": 0})
  accumulator.Reload()
  counts = {
    e.step: float(tensor_util.make_ndarray(e.tensor_proto))
    for e in accumulator.Tensors("nonfinite_steps")
  }
  assert counts == {2: 0.0, 4: 0.0, 6: 1.0}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("finished"))
  runs.train(tiny.get_config(), workdir)
  return workdir


def truncate_checkpoint(workdir, step):
  """Cuts every array data file of a checkpoint in half, as a full disk or a crash would."""
  state = os.path.join(workdir, "checkpoints", str(step), "state")
  files = glob.glob(os.path.join(state, "d", "*")) + glob.glob(
    os.path.join(state, "ocdbt.process_*", "d", "*")
  )
  assert files
  for path in files:
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 2)


# The failed restore's other tensorstore reads finish after orbax's asyncio loop has closed; their
# callbacks are reported as unraisable "Event loop is closed" errors (orbax's, not this code's).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_truncated_checkpoint_is_named_and_the_fallback_resumes_from_the_previous(
  finished_run, tmp_path
):
  workdir = str(tmp_path / "run")
  shutil.copytree(finished_run, workdir)
  truncate_checkpoint(workdir, 6)
  config = tiny.get_config()
  config.training.num_train_steps = 9
  with pytest.raises(
    checkpointing.UnreadableCheckpointError,
    match=r"(?s)checkpoint of step 6 in .* cannot be read.*restore_fallback=True",
  ):
    runs.train(config, workdir)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3", "6"]
  config.training.restore_fallback = True
  final = runs.train(config, workdir)
  assert int(final.step) == 9
  assert os.listdir(os.path.join(workdir, "checkpoints_unreadable")) == ["6"]  # kept, not lost
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3", "6", "9"]
