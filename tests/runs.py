"""What most tests do to a ConfigDict: type it, build its run, train it."""

from jax_ddpm.config import builders, run_config
from jax_ddpm.training import loop


def typed(config) -> run_config.RunConfig:
  """The RunConfig of a ConfigDict (configs/*.py with a test's changes)."""
  return run_config.from_config_dict(config)


def build(config) -> builders.Run:
  """The built Run of a ConfigDict."""
  return builders.build(typed(config))


def train(config, workdir: str):
  """Trains (or resumes) a ConfigDict's run in workdir; returns the final TrainState."""
  return loop.train_and_evaluate(build(config), workdir)
