"""The train step, the samplers, the benchmarks and a whole training run work where TensorFlow is
not installed (the accelerator machine's image has none): in these processes any import of
TensorFlow fails, as it does there."""

import os
import subprocess
import sys

from tensorboard.backend.event_processing import event_accumulator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NO_TENSORFLOW = "import sys; sys.modules['tensorflow'] = None; "  # `import tensorflow` fails


def python(program: str, *args: str) -> str:
  done = subprocess.run(
    [sys.executable, "-c", NO_TENSORFLOW + program, *args],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  return done.stdout


def test_the_train_step_samplers_loop_and_benchmarks_import_without_tensorflow():
  modules = [
    "jax_ddpm.training.step",
    "jax_ddpm.samplers.program",
    "jax_ddpm.samplers.registry",
    "jax_ddpm.training.loop",
    "jax_ddpm.cli",
    "benchmarks.accelerator",
    "benchmarks.jax_cases",
  ]
  out = python(
    f"import {', '.join(modules)}; print('tensorflow' in sys.modules and "
    "sys.modules['tensorflow'] is not None)"
  )
  assert out.split()[-1] == "False"


def test_a_run_trains_and_writes_its_curves_without_tensorflow(tmp_path):
  workdir = str(tmp_path / "run")
  python(
    "import jax_ddpm; from configs import tiny; config = tiny.get_config(); "
    "config.training.num_train_steps = 4; config.training.checkpoint_every_steps = 2; "
    "config.training.sample_every_steps = 4; jax_ddpm.train(config, sys.argv[1])",
    workdir,
  )
  accumulator = event_accumulator.EventAccumulator(workdir, size_guidance={"tensors": 0})
  accumulator.Reload()
  tags = set(accumulator.Tags()["tensors"])
  assert {"loss", "steps_per_sec", "uptime", "samples"} <= tags, tags
  assert [event.step for event in accumulator.Tensors("loss")] == [2, 4]
