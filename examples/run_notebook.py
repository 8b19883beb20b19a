"""Executes examples/explore.ipynb headless and keeps what it drew.

  python examples/run_notebook.py [--config=mnist] [--workdir=runs/mnist]
      [--output=runs/mnist/explore.ipynb] [--figures=docs/explore]

Runs every cell in a fresh Jupyter kernel (nbclient), with the run chosen through the
environment variables the notebook reads, JAX_DDPM_CONFIG and JAX_DDPM_WORKDIR, and
JAX_DDPM_NOTEBOOK_STATIC=1: no front end shows sliders here, so each is drawn once as a static
figure (nbclient can also stall for its whole cell timeout after a widget cell). --output saves
the executed notebook, --figures every PNG it drew, numbered in order (<prefix>_1.png, ...).
A cell that fails stops the run with the cell's error.
"""

from __future__ import annotations

import argparse
import base64
import os

NOTEBOOK = os.path.join(os.path.dirname(os.path.abspath(__file__)), "explore.ipynb")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def execute(config: str, workdir: str, timeout: int = 600):
  """The notebook after running every cell against `config` (a shipped config's name or a
  config file) and `workdir` (relative to the repository root or absolute)."""
  import nbclient
  import nbformat

  notebook = nbformat.read(NOTEBOOK, as_version=4)
  client = nbclient.NotebookClient(
    notebook, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": ROOT}}
  )
  # The kernel's environment: this process's, plus the run to show.
  client.execute(
    env=dict(
      os.environ, JAX_DDPM_CONFIG=config, JAX_DDPM_WORKDIR=workdir, JAX_DDPM_NOTEBOOK_STATIC="1"
    )
  )
  return notebook


def pngs(notebook) -> list[bytes]:
  """Every PNG the executed notebook displays, in order."""
  return [
    base64.b64decode(output["data"]["image/png"])
    for cell in notebook.cells
    if cell.cell_type == "code"
    for output in cell.get("outputs", [])
    if "image/png" in output.get("data", {})
  ]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="mnist")
  parser.add_argument("--workdir", default="runs/mnist")
  parser.add_argument("--output", default=None)
  parser.add_argument("--figures", default=None, help="path prefix of the PNG files")
  args = parser.parse_args()
  notebook = execute(args.config, args.workdir)
  if args.output:
    import nbformat

    nbformat.write(notebook, args.output)
  for index, data in enumerate(pngs(notebook) if args.figures else [], start=1):
    with open(f"{args.figures}_{index}.png", "wb") as f:
      f.write(data)
  print(f"Executed {NOTEBOOK}: {len(pngs(notebook))} figures.")


if __name__ == "__main__":
  main()
