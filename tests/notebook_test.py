"""examples/explore.ipynb runs top to bottom in a Jupyter kernel, so it cannot rot."""

import os
import sys

import pytest

from configs import tiny
from jax_ddpm import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))
import run_notebook  # pylint: disable=g-import-not-at-top,wrong-import-position


def widget_views(notebook) -> int:
  return sum("application/vnd.jupyter.widget-view+json" in output.get("data", {})
             for cell in notebook.cells if cell.cell_type == "code"
             for output in cell.get("outputs", []))


def test_the_explorer_draws_every_section_of_a_tiny_checkpoint(tmp_path):
  config = tiny.get_config()
  for key in ("num_train_steps", "checkpoint_every_steps", "sample_every_steps",
              "log_every_steps"):
    config.training[key] = 2
  workdir = str(tmp_path / "tiny")
  train.train_and_evaluate(config, workdir)
  notebook = run_notebook.execute("configs/tiny.py", workdir)
  # Static figures: schedules, forward strip, reverse strip, samples-by-timesteps grid.
  assert len(run_notebook.pngs(notebook)) >= 4
  assert widget_views(notebook) == 2  # the forward and the reverse slider
  printed = "".join(output.get("text", "") for cell in notebook.cells
                    if cell.cell_type == "code" for output in cell.get("outputs", []))
  assert "step 2 of" in printed and "ddim, 4 network calls" in printed


def test_without_a_checkpoint_the_explorer_says_how_to_get_one(tmp_path):
  notebook = run_notebook.execute("configs/tiny.py", str(tmp_path / "empty"))
  printed = "".join(output.get("text", "") for cell in notebook.cells
                    if cell.cell_type == "code" for output in cell.get("outputs", []))
  assert "No checkpoint in" in printed and "--mode=import" in printed
  assert len(run_notebook.pngs(notebook)) >= 2  # the schedules and the forward process
