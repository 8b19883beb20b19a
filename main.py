"""jax_ddpm's command line: parses flags and hands the config to the library.

  python main.py --config=configs/mnist.py --workdir=runs/mnist            # train (or resume)
  python main.py --mode=sample --config=configs/mnist.py --workdir=runs/mnist
  python main.py --mode=import --config=configs/cifar10.py --import_from=DIR --workdir=runs/x
  python main.py --mode=eval --config=configs/cifar10.py --workdir=runs/x     # FID
  python main.py --mode=train_classifier --config=configs/mnist.py --workdir=runs/mnist
  python main.py --mode=import_inception --import_from=default_1.pt --config=... --workdir=...
  python main.py --mode=import_inception --import_from=inception-2015-12-05.tgz ...  # + IS layer
"""

import os
import sys

# One XLA CPU device per core on CPU-only hosts (jax_ddpm/host_devices.py says why); set
# before JAX is imported.
from jax_ddpm.runtime import devices as host_devices  # pylint: disable=g-import-not-at-top

os.environ["XLA_FLAGS"] = host_devices.with_cpu_devices(os.environ.get("XLA_FLAGS", ""))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # pylint: disable=g-import-not-at-top
import jax  # pylint: disable=g-import-not-at-top
from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

MODES = ("train", "sample", "visualize", "import", "eval", "train_classifier", "import_inception")

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/mnist.py.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, summaries and samples.")
flags.DEFINE_enum("mode", "train", MODES, "What to do.")
flags.DEFINE_string("import_from", None, "--mode=import: a diffusers UNet2DModel folder; "
                    "--mode=import_inception: the TorchScript FID Inception (default_1.pt) or "
                    "TensorFlow's inception-2015-12-05.tgz (adds the Inception Score's layer).")
flags.DEFINE_integer("step", None,
                     "--mode=sample/visualize/eval: the checkpoint step (default: the latest).")
flags.DEFINE_bool("distributed", False,
                  "Call jax.distributed.initialize() (multi-host TPU/GPU; coordinator from the "
                  "environment, or from the three flags below).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (with --distributed).")
flags.DEFINE_integer("num_processes", None, "Number of processes (with --distributed).")
flags.DEFINE_integer("process_id", None, "This process's index (with --distributed).")
flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraries:
  """Drops INFO lines from orbax (dozens per checkpoint); its warnings and errors still show."""

  def filter(self, record):
    return record.levelno > 20 or "/orbax/" not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_QuietLibraries())
  if FLAGS.distributed:
    jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                               num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
  logging.info("JAX process %d of %d; devices: %s", jax.process_index(), jax.process_count(),
               jax.devices())
  from jax_ddpm.cli import sample_mode
  from jax_ddpm.training import state
  from jax_ddpm.training import loop as train  # pylint: disable=g-import-not-at-top
  if FLAGS.mode == "train":
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  elif FLAGS.mode == "sample":
    sample_mode.sample_to_workdir(FLAGS.config, FLAGS.workdir, FLAGS.step)
  elif FLAGS.mode == "visualize":
    from jax_ddpm.evaluation import pictures as visualize  # pylint: disable=g-import-not-at-top
    for path in visualize.visualize(FLAGS.config, FLAGS.workdir, FLAGS.step):
      logging.info("Wrote %s", path)
  elif FLAGS.mode == "import":
    if not FLAGS.import_from:
      raise app.UsageError("--mode=import needs --import_from=<diffusers UNet2DModel folder>.")
    step = state.import_diffusers_checkpoint(FLAGS.config, FLAGS.workdir, FLAGS.import_from)
    logging.info("Imported %s as the checkpoint of step %d in %s.", FLAGS.import_from, step,
                 FLAGS.workdir)
  elif FLAGS.mode == "eval":
    from jax_ddpm.evaluation import scoring as evaluate  # pylint: disable=g-import-not-at-top
    evaluate.evaluate(FLAGS.config, FLAGS.workdir, FLAGS.step)
  elif FLAGS.mode == "train_classifier":
    from jax_ddpm.evaluation import scoring as evaluate  # pylint: disable=g-import-not-at-top
    evaluate.train_classifier(FLAGS.config, FLAGS.workdir)
  elif FLAGS.mode == "import_inception":
    from jax_ddpm.evaluation import inception_weights as fid_weights  # pylint: disable=g-import-not-at-top
    if not FLAGS.import_from:
      raise app.UsageError("--mode=import_inception needs --import_from=<default_1.pt or "
                           "inception-2015-12-05.tgz>. " + fid_weights.HOW_TO_GET)
    output = FLAGS.config.eval.inception_weights or fid_weights.default_path()
    logging.info("Wrote %s.", fid_weights.import_weights(FLAGS.import_from, output))


def run_and_report(argv):
  """Runs main; a user's mistake (bad config, flag or file) ends the process with its message alone.

  Program errors keep their traceback. After a failed checkpoint read, orbax leaves
  asynchronous tasks behind whose shutdown would bury the message under tracebacks, so the
  process exits at once (everything was already flushed by the library's own cleanup).
  """
  from jax_ddpm.training import checkpointing
  from jax_ddpm.io import errors  # pylint: disable=g-import-not-at-top
  try:
    main(argv)
  except (errors.UserInputError, checkpointing.UnreadableCheckpointError, FloatingPointError,
          FileNotFoundError) as error:
    logging.error("%s: %s", type(error).__name__, error)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)


if __name__ == "__main__":
  app.run(run_and_report)
