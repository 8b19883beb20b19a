"""Non-finite guards, damaged checkpoints, and a two-process jax.distributed run.

Kills at random moments are in preemption_test.py.
"""

import glob
import os
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

import fault_injection
from configs import tiny
from jax_ddpm import checkpointing, state, train

ROOT = fault_injection.ROOT


def nan_config(policy, steps=6):
  config = tiny.get_config()
  config.training.num_train_steps = steps
  config.training.nonfinite_policy = policy
  config.debug.inject_nonfinite_at_steps = (4,)
  return config


def test_halt_policy_stops_at_the_bad_step_and_keeps_the_last_checkpoint(tmp_path):
  with pytest.raises(FloatingPointError,
                     match=r"Non-finite loss or gradient at step 4 .*last checkpoint, step 3, "
                           r"is kept"):
    train.train_and_evaluate(nan_config("halt"), str(tmp_path))
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["3"]


def test_skip_policy_withholds_the_bad_update_and_counts_it(tmp_path):
  final = train.train_and_evaluate(nan_config("skip"), str(tmp_path))
  assert int(final.step) == 6 and int(final.nonfinite_steps) == 1
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(final.params)))
  from tensorboard.backend.event_processing import event_accumulator
  from tensorboard.util import tensor_util
  accumulator = event_accumulator.EventAccumulator(str(tmp_path), size_guidance={"tensors": 0})
  accumulator.Reload()
  counts = {e.step: float(tensor_util.make_ndarray(e.tensor_proto))
            for e in accumulator.Tensors("nonfinite_steps")}
  assert counts == {2: 0.0, 4: 0.0, 6: 1.0}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("finished"))
  train.train_and_evaluate(tiny.get_config(), workdir)
  return workdir


def truncate_checkpoint(workdir, step):
  """Cuts every array data file of a checkpoint in half, as a full disk or a crash would."""
  state = os.path.join(workdir, "checkpoints", str(step), "state")
  files = glob.glob(os.path.join(state, "d", "*")) + glob.glob(
      os.path.join(state, "ocdbt.process_*", "d", "*"))
  assert files
  for path in files:
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 2)


def test_a_truncated_checkpoint_is_named_and_the_fallback_resumes_from_the_previous(
    finished_run, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(finished_run, workdir)
  truncate_checkpoint(workdir, 6)
  config = tiny.get_config()
  config.training.num_train_steps = 9
  with pytest.raises(checkpointing.UnreadableCheckpointError,
                     match=r"(?s)checkpoint of step 6 in .* cannot be read.*restore_fallback=True"):
    train.train_and_evaluate(config, workdir)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3", "6"]
  config.training.restore_fallback = True
  final = train.train_and_evaluate(config, workdir)
  assert int(final.step) == 9
  assert os.listdir(os.path.join(workdir, "checkpoints_unreadable")) == ["6"]  # kept, not lost
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3", "6", "9"]


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_train_like_one_process_on_eight_devices(finished_run, tmp_path):
  """2 processes x 4 CPU devices through jax.distributed, against 1 process x 8 devices."""
  workdir = str(tmp_path / "two")
  port = free_port()
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
  processes = [subprocess.Popen(
      [sys.executable, os.path.join(ROOT, "main.py"), "--config=" + os.path.join(
          ROOT, "configs", "tiny.py"), f"--workdir={workdir}", "--distributed",
       f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
      cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
      for i in range(2)]
  outputs = [p.communicate(timeout=400)[1] for p in processes]
  for process, output in zip(processes, outputs):
    assert process.returncode == 0, output[-3000:]
  # Same global batches, keys and program as the one-process run (finished_run, 8 devices).
  two, one = (fault_injection.final_state(w, 6) for w in (workdir, finished_run))
  for a, b in zip(jax.tree.leaves(two), jax.tree.leaves(one)):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
  assert len(glob.glob(os.path.join(workdir, "events.out.tfevents.*"))) == 1  # process 0 only
  assert os.listdir(os.path.join(workdir, "samples")) == ["train_step_00000006.png"]
  # The checkpoint written by two processes loads in this one process, through the same
  # restore as resuming and sampling.
  _, restored, step = state.load_checkpoint(tiny.get_config(), workdir)
  _, reference, _ = state.load_checkpoint(tiny.get_config(), finished_run)
  assert step == 6
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(reference)):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
