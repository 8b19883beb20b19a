"""The command line, `jax-ddpm` (or `python main.py`): flags, and one function per --mode.

Each mode reads its flags, turns the config into a typed run (config/) and calls the library;
MODES is the table main() looks the mode up in, and what --help prints. A mistake of the user's
(a config value, a flag, a file) ends the process with its message alone, without a traceback.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable

# TensorFlow's C++ logging (clu's summary writers load TensorFlow) from warnings up, set before
# anything imports it.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import ml_collections  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from jax_ddpm.config import shipped  # noqa: E402
from jax_ddpm.io import errors  # noqa: E402
from jax_ddpm.runtime import devices  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Arguments:
  """What a mode reads of the command line: the config (a ConfigDict with the --config.*
  overrides), the workdir, and the flags some modes take."""

  config: ml_collections.ConfigDict
  workdir: str
  step: int | None = None
  import_from: str | None = None
  mode: str = "train"


@dataclasses.dataclass(frozen=True)
class Mode:
  run: Callable[[Arguments], object]
  summary: str
  example: str


FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
  "config",
  None,
  "A config file (configs/mnist.py) or the name of a shipped config (mnist).",
  lock_config=True,
)
flags.DEFINE_string(
  "workdir", None, "Directory (local or gs://) for checkpoints, summaries and samples."
)
flags.DEFINE_string(
  "import_from",
  None,
  "--mode=import: a diffusers UNet2DModel folder; "
  "--mode=import_inception: the TorchScript FID Inception (default_1.pt) or "
  "TensorFlow's inception-2015-12-05.tgz (adds the Inception Score's layer).",
)
flags.DEFINE_integer(
  "step", None, "--mode=sample/visualize/eval: the checkpoint step (default: the latest)."
)
flags.DEFINE_bool(
  "distributed",
  False,
  "Call jax.distributed.initialize() (multi-host TPU/GPU; "
  "coordinator from the environment, or from the three flags below).",
)
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (with --distributed).")
flags.DEFINE_integer("num_processes", None, "Number of processes (with --distributed).")
flags.DEFINE_integer("process_id", None, "This process's index (with --distributed).")
flags.mark_flags_as_required(["config", "workdir"])


# Each mode imports the library parts it uses, so that --help and a mistyped flag answer at once.
def _run(args: Arguments):
  """The typed, built run (config.builders.Run) of the config with its --config.* overrides."""
  from jax_ddpm.config import builders, run_config  # noqa: PLC0415

  return builders.build(run_config.from_config_dict(args.config))


def train(args: Arguments):
  from jax_ddpm.training import loop  # noqa: PLC0415

  return loop.train_and_evaluate(_run(args), args.workdir)


def sample(args: Arguments) -> str:
  from jax_ddpm.io import paths, sample_files  # noqa: PLC0415
  from jax_ddpm.runtime import mesh  # noqa: PLC0415
  from jax_ddpm.samplers import program  # noqa: PLC0415
  from jax_ddpm.training import checkpointing  # noqa: PLC0415

  run = _run(args)
  model = checkpointing.load_checkpoint(run, args.workdir, args.step)
  drawer = program.from_run(run, *model, mesh.data_mesh())
  directory = paths.join(args.workdir, "samples", drawer.name)
  return sample_files.write_samples(
    directory,
    drawer.settings,
    run.config.sampling.num_samples,
    drawer.batch_size,
    drawer.draw_batch,
    drawer.prompts,
  )


def visualize(args: Arguments) -> list[str]:
  from jax_ddpm.data import sources  # noqa: PLC0415
  from jax_ddpm.evaluation import pictures  # noqa: PLC0415
  from jax_ddpm.runtime import mesh  # noqa: PLC0415
  from jax_ddpm.training import checkpointing  # noqa: PLC0415

  run = _run(args)
  if run.config.autoencoder.latent:
    raise errors.ConfigError(
      "--mode=visualize draws the forward and reverse process of images; a latent run "
      f"(autoencoder.checkpoint={run.config.autoencoder.checkpoint!r}) diffuses latents: "
      "draw its samples with --mode=sample."
    )
  eval_graphdef, state, step = checkpointing.load_checkpoint(run, args.workdir, args.step)
  source = sources.create_source(run.config.data)
  sources.check_source_shape(source, run.config.data)
  params = state.ema_params if run.config.sampling.use_ema else state.params
  drawn = pictures.draw(run, eval_graphdef, params, source.read([0])[0], mesh.data_mesh())
  paths = pictures.write(args.workdir, step, *drawn)
  for path in paths:
    logging.info("Wrote %s", path)
  return paths


def import_diffusers(args: Arguments) -> int:
  from jax_ddpm.models import diffusers_weights  # noqa: PLC0415
  from jax_ddpm.training import checkpointing  # noqa: PLC0415

  folder = _required(args, "import_from", "a diffusers UNet2DModel folder")
  run = _run(args)
  _, params = diffusers_weights.load_diffusers_unet(folder, run.unet)
  step = checkpointing.save_imported(run, args.workdir, params)
  logging.info("Imported %s as the checkpoint of step %d in %s.", folder, step, args.workdir)
  return step


def evaluate(args: Arguments) -> dict:
  from jax_ddpm.evaluation import report  # noqa: PLC0415
  from jax_ddpm.training import checkpointing  # noqa: PLC0415

  run = _run(args)
  return report.evaluate(
    run, args.workdir, lambda: checkpointing.load_checkpoint(run, args.workdir, args.step)
  )


def train_classifier(args: Arguments) -> dict:
  from jax_ddpm.config import run_config  # noqa: PLC0415
  from jax_ddpm.data import sources  # noqa: PLC0415
  from jax_ddpm.evaluation import classifier  # noqa: PLC0415

  config = run_config.from_config_dict(args.config)
  images, labels = sources.read_labelled(config.data, "train")
  return classifier.train_and_save(
    images,
    labels,
    classifier.path_for(config.eval, args.workdir),
    num_steps=config.eval.classifier_steps,
    batch_size=config.eval.classifier_batch_size,
    seed=config.seed,
  )


def train_autoencoder(args: Arguments) -> dict:
  from jax_ddpm.config import builders, run_config  # noqa: PLC0415
  from jax_ddpm.training import autoencoder  # noqa: PLC0415

  config = run_config.from_config_dict(args.config)
  return autoencoder.train_and_save(config, builders.autoencoder_config(config), args.workdir)


def import_inception(args: Arguments) -> str:
  from jax_ddpm.config import run_config  # noqa: PLC0415
  from jax_ddpm.evaluation import inception_weights  # noqa: PLC0415

  source = _required(
    args, "import_from", "default_1.pt or inception-2015-12-05.tgz. " + inception_weights.HOW_TO_GET
  )
  config = run_config.from_config_dict(args.config)
  output = config.eval.inception_weights or inception_weights.default_path()
  written = inception_weights.import_weights(source, output)
  logging.info("Wrote %s.", written)
  return written


MODES = {
  "train": Mode(
    train,
    "train a model, or resume its run from the newest checkpoint",
    "jax-ddpm --config=mnist --workdir=runs/mnist",
  ),
  "sample": Mode(
    sample,
    "draw sampling.num_samples images into WORKDIR/samples/ (resumable)",
    "jax-ddpm --mode=sample --config=mnist --workdir=runs/mnist --config.sampling.num_samples=1000",
  ),
  "visualize": Mode(
    visualize,
    "pictures of the schedules, the forward and reverse process",
    "jax-ddpm --mode=visualize --config=mnist --workdir=runs/mnist",
  ),
  "eval": Mode(
    evaluate,
    "FID (or a classifier's feature distance), IS, KID, P/R, bits/dim",
    "jax-ddpm --mode=eval --config=mnist --workdir=runs/mnist",
  ),
  "train_autoencoder": Mode(
    train_autoencoder,
    "train latent diffusion's autoencoder (the autoencoder section) in its own workdir",
    "jax-ddpm --mode=train_autoencoder --config=mnist_text --workdir=runs/mnist_autoencoder",
  ),
  "train_classifier": Mode(
    train_classifier,
    "train the digit classifier eval's features use",
    "jax-ddpm --mode=train_classifier --config=mnist --workdir=runs/mnist",
  ),
  "import": Mode(
    import_diffusers,
    "a diffusers UNet2DModel's weights as checkpoint 0",
    "jax-ddpm --mode=import --config=cifar10 --workdir=runs/ddpm_cifar10 "
    "--import_from=ddpm-cifar10-32",
  ),
  "import_inception": Mode(
    import_inception,
    "convert the FID Inception's weights once",
    "jax-ddpm --mode=import_inception --config=cifar10 --workdir=. --import_from=default_1.pt",
  ),
}
flags.DEFINE_enum("mode", "train", list(MODES), "What to do (see the list above).")


def usage() -> str:
  """The text --help prints: the command, every mode with one line and an example."""
  width = max(len(name) for name in MODES)
  lines = [
    "jax-ddpm (or python main.py): denoising diffusion models in JAX.",
    "",
    "  jax-ddpm --mode=MODE --config=CONFIG --workdir=DIR [--config.KEY=VALUE ...]",
    "",
    f"CONFIG: a config file, or a shipped config: {', '.join(shipped.names())}.",
    "",
    "Modes:",
  ]
  for name, mode in MODES.items():
    lines += [f"  {name:<{width}}  {mode.summary}", f"  {'':<{width}}    {mode.example}"]
  lines += ["", "Flags:", FLAGS.module_help(__name__), ""]
  return "\n".join(lines)


def _required(args: Arguments, flag: str, what: str) -> str:
  value = getattr(args, flag)
  if not value:
    raise app.UsageError(f"--mode={args.mode} needs --{flag}=<{what}>.")
  return value


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_QuietLibraries())
  if FLAGS.distributed:
    jax.distributed.initialize(
      coordinator_address=FLAGS.coordinator_address,
      num_processes=FLAGS.num_processes,
      process_id=FLAGS.process_id,
    )
  logging.info(
    "JAX process %d of %d; devices: %s", jax.process_index(), jax.process_count(), jax.devices()
  )
  try:
    MODES[FLAGS.mode].run(
      Arguments(FLAGS.config, FLAGS.workdir, FLAGS.step, FLAGS.import_from, FLAGS.mode)
    )
  except (errors.UserInputError, FloatingPointError, FileNotFoundError) as error:
    # A user's mistake: the message alone. After a failed checkpoint read orbax leaves
    # asynchronous tasks whose shutdown would bury it under tracebacks, so the process exits at
    # once (the library's own cleanup has flushed everything).
    logging.error("%s: %s", type(error).__name__, error)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)


class _QuietLibraries:
  """Drops INFO lines from orbax (dozens per checkpoint); its warnings and errors still show."""

  def filter(self, record):
    return record.levelno > 20 or "/orbax/" not in record.pathname


def run(argv: list[str] | None = None) -> None:
  """The console command: one XLA CPU device per core on CPU hosts, shipped configs by name."""
  os.environ["XLA_FLAGS"] = devices.with_cpu_devices(os.environ.get("XLA_FLAGS", ""))
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  argv = [_resolve_config(arg) for arg in (sys.argv if argv is None else argv)]
  sys.modules["__main__"].__doc__ = usage()  # what absl's --help prints above the flags
  app.run(main, argv=argv)


def _resolve_config(arg: str) -> str:
  """--config=NAME of a shipped config as its file's path; other arguments unchanged."""
  if not arg.startswith("--config="):
    return arg
  try:
    return "--config=" + shipped.resolve(arg[len("--config=") :])
  except errors.MissingInputError as error:
    sys.exit(f"FATAL Flags parsing error: {error}")
