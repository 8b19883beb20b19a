"""examples/explore.ipynb runs top to bottom in a Jupyter kernel, so it cannot rot."""

import os
import sys

import runs

from configs import tiny
from jax_ddpm.runtime import mesh as parallel
from jax_ddpm.training import checkpointing, state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))
import run_notebook  # noqa: E402


def freshly_initialised_checkpoint(workdir: str) -> None:
  """A step-0 checkpoint of the tiny config, as a training run's first save writes it."""
  run = runs.build(tiny.get_config())
  mesh = parallel.data_mesh()
  _, _, initial = state.create_train_state(run.unet, run.config.seed, mesh, run.optimizer)
  checkpointer = checkpointing.Checkpointer(workdir)
  checkpointer.save(0, initial, run.metadata)
  checkpointer.close()


def test_the_explorer_draws_every_section_of_a_tiny_checkpoint(tmp_path):
  workdir = str(tmp_path / "tiny")
  freshly_initialised_checkpoint(workdir)
  notebook = run_notebook.execute("tiny", workdir, timeout=240)
  # Schedules, forward strip, forward slider's view, reverse strip, reverse slider's view, and
  # the samples-by-timesteps grid.
  assert len(run_notebook.pngs(notebook)) == 6
  printed = "".join(
    output.get("text", "")
    for cell in notebook.cells
    if cell.cell_type == "code"
    for output in cell.get("outputs", [])
  )
  assert "step 0 of" in printed and "ddim, 4 network calls" in printed


def test_without_a_checkpoint_the_explorer_says_how_to_get_one(tmp_path):
  notebook = run_notebook.execute("configs/tiny.py", str(tmp_path / "empty"), timeout=240)
  printed = "".join(
    output.get("text", "")
    for cell in notebook.cells
    if cell.cell_type == "code"
    for output in cell.get("outputs", [])
  )
  assert "No checkpoint in" in printed and "--mode=import" in printed
  assert len(run_notebook.pngs(notebook)) == 3  # the schedules and the forward process
