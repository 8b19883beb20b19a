"""Kills a training run again and again, then checks it ends exactly where an unbroken run ends.

Each attempt starts the same `main.py` command on configs/tiny.py; once the run is training (or,
for some attempts, once an asynchronous checkpoint write is under way) it is sent SIGKILL or
SIGTERM at a random moment. After the last kill the command runs to completion, and its final
parameters, EMA parameters and optimizer state must equal, bitwise, those of a run that was
never interrupted.

  python tests/fault_injection.py --workdir=/tmp/faults --kills=8 --steps=40

tests/preemption_test.py runs a short form of it (two signals, 8 steps).
"""

from __future__ import annotations

import argparse
import glob
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOGGED_STEP = re.compile(r"\] \[(\d+)\] .*loss=")


def command(workdir: str, steps: int) -> list[str]:
  return [
    sys.executable,
    os.path.join(ROOT, "main.py"),
    "--config=" + os.path.join(ROOT, "configs", "tiny.py"),
    f"--workdir={workdir}",
    f"--config.training.num_train_steps={steps}",
    "--config.training.log_every_steps=1",
    "--config.training.checkpoint_every_steps=2",
    f"--config.training.sample_every_steps={steps}",
    "--config.training.keep_checkpoints=3",
  ]


class Run:
  """A main.py process whose log is followed on a thread for the steps it reports."""

  def __init__(self, args: list[str], cwd: str = ROOT, env: dict | None = None):
    self.process = subprocess.Popen(
      args, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    self.last_step = None
    self.log: list[str] = []
    self._reader = threading.Thread(target=self._read, daemon=True)
    self._reader.start()

  def _read(self):
    for line in self.process.stderr:
      self.log.append(line)
      match = LOGGED_STEP.search(line)
      if match:
        self.last_step = int(match.group(1))

  def wait(self, timeout: float) -> int:
    code = self.process.wait(timeout=timeout)
    self._reader.join(timeout=5)
    return code


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def temporary_checkpoints(workdir: str) -> set[str]:
  """orbax's directories of checkpoints being written (renamed when complete)."""
  return set(glob.glob(os.path.join(workdir, "checkpoints", "*orbax-checkpoint-tmp*")))


def final_state(workdir: str, step: int):
  """The saved TrainState of `step` as a tree of arrays on this process's first device.

  Works whatever topology wrote the checkpoint (e.g. two processes).
  """
  import jax
  import orbax.checkpoint as ocp

  path = os.path.join(workdir, "checkpoints", str(step), "state")
  checkpointer = ocp.StandardCheckpointer()
  metadata = checkpointer.metadata(path)
  tree = getattr(metadata, "item_metadata", metadata)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)
  return checkpointer.restore(path, target)


def inject_faults(workdir: str, kills: int, steps: int, seed: int, timeout: float = 300.0):
  """Runs the experiment; returns (rows describing each attempt, whether the states match)."""
  import jax
  import numpy as np

  rng = random.Random(seed)
  reference, broken = os.path.join(workdir, "reference"), os.path.join(workdir, "broken")
  if Run(command(reference, steps)).wait(timeout) != 0:
    raise RuntimeError("The uninterrupted reference run failed.")
  rows = []
  for attempt in range(kills):
    sent = signal.SIGKILL if attempt % 2 == 0 else signal.SIGTERM
    during_write = attempt % 3 == 1
    leftovers = temporary_checkpoints(broken)  # of writes killed in earlier attempts
    run = Run(command(broken, steps))
    start_step = run.last_step
    deadline = time.time() + timeout
    moment = "finished first"
    while run.process.poll() is None and time.time() < deadline:
      if during_write and temporary_checkpoints(broken) - leftovers:
        moment = "during a checkpoint write"
        break
      if not during_write and run.last_step is not None and run.last_step != start_step:
        time.sleep(rng.uniform(0.0, 1.5))
        moment = f"after step {run.last_step} + random delay"
        break
      time.sleep(0.01)
    if run.process.poll() is None:
      run.process.send_signal(sent)
    code = run.wait(timeout)
    saved = (
      sorted(
        int(name) for name in os.listdir(os.path.join(broken, "checkpoints")) if name.isdigit()
      )
      if os.path.isdir(os.path.join(broken, "checkpoints"))
      else []
    )
    rows.append([attempt + 1, signal.Signals(sent).name, moment, code, saved])
  code = Run(command(broken, steps)).wait(timeout)
  rows.append(["final", "-", "run to the end", code, []])
  if code != 0:
    return rows, False
  ours, theirs = final_state(broken, steps), final_state(reference, steps)
  same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)))
  return rows, same


def main():
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--kills", type=int, default=8)
  parser.add_argument("--steps", type=int, default=40)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  rows, same = inject_faults(args.workdir, args.kills, args.steps, args.seed)
  print("| attempt | signal | sent | exit code | checkpoints afterwards |")
  print("|---|---|---|---|---|")
  for row in rows:
    print("| " + " | ".join(str(x) for x in row) + " |")
  print(f"\nFinal state equals the uninterrupted run's, bitwise: {same}")
  sys.exit(0 if same else 1)


if __name__ == "__main__":
  main()
