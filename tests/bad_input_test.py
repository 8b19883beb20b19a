"""Every user-named file and directory, given broken: one clear error naming the input.

For each input (flag or config key) and each way it can be wrong, the entry point a user runs
must raise a UserInputError whose message names the input, before it compiles any program of
ours (sampling, training, feature extraction), and leave the workdir exactly as it was. The
command line then prints that message alone (last tests).
"""

import logging
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import runs
from flax import nnx

from configs import tiny
from jax_ddpm import cli
from jax_ddpm.evaluation import classifier as feature_classifier
from jax_ddpm.evaluation import inception_weights as fid_weights
from jax_ddpm.io import errors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# Ways a file can be wrong; each writes the broken file at `path`.
def missing(path):
  del path


def a_directory(path):
  os.makedirs(path)


def empty(path):
  open(path, "wb").close()


def not_an_archive(path):
  with open(path, "wb") as f:
    f.write(b"this is not the file you are looking for\n" * 4)


def truncated_npz(path):
  np.savez(path, arr_0=np.zeros((64, 16, 16, 1), np.uint8), mu=np.zeros(3))
  with open(path, "rb") as f:
    data = f.read()
  with open(path, "wb") as f:
    f.write(data[: len(data) // 2])


def pickled_object_array(path):
  np.savez(
    path,
    arr_0=np.array([{"payload": 1}, None], dtype=object),
    mu=np.array([None], dtype=object),
    sigma=np.array([None], dtype=object),
  )


def wrong_dtype_samples(path):
  np.savez(path, arr_0=np.zeros((200, 16, 16, 1), np.float32))


def wrong_shape_samples(path):
  np.savez(path, arr_0=np.zeros((200, 32, 32, 3), np.uint8))


def too_few_samples(path):
  np.savez(path, arr_0=np.zeros((100, 16, 16, 1), np.uint8))


def wrong_shape_statistics(path):
  np.savez(path, mu=np.zeros(128), sigma=np.zeros((128, 3)))


def wrong_shape_weights(path):
  np.savez(path, **{"Conv2d_1a_3x3.conv.weight": np.zeros((3, 3))})


def classifier_of_other_shapes(path):
  model = feature_classifier.Classifier(
    feature_classifier.ClassifierConfig(16, 1, 10, width=8), rngs=nnx.Rngs(0)
  )
  feature_classifier.save(model, path)
  with np.load(path) as data:
    arrays = dict(data)
  arrays["conv_1.kernel"] = np.zeros((5, 5, 1, 8), np.float32)
  np.savez(path, **arrays)


def npz_without_architecture(path):
  np.savez(path, weights=np.zeros(3))


def pickle_file(path):
  with open(path, "wb") as f:
    pickle.dump({"not": "weights"}, f)


FILE_DEFECTS = [missing, a_directory, empty, not_an_archive, truncated_npz, pickled_object_array]

EVAL_FILE_CASES = (
  [
    ("samples", defect)
    for defect in FILE_DEFECTS + [wrong_dtype_samples, wrong_shape_samples, too_few_samples]
  ]
  + [("reference_stats", defect) for defect in FILE_DEFECTS + [wrong_shape_statistics]]
  + [("inception_weights", defect) for defect in FILE_DEFECTS + [wrong_shape_weights]]
  + [
    ("classifier", defect)
    for defect in FILE_DEFECTS + [npz_without_architecture, classifier_of_other_shapes]
  ]
)


def snapshot(directory):
  """Every file under `directory` with its size and modification time."""
  return {
    os.path.relpath(os.path.join(root, name), directory): (
      os.path.getsize(os.path.join(root, name)),
      os.path.getmtime(os.path.join(root, name)),
    )
    for root, _, names in os.walk(directory)
    for name in names
  }


@pytest.fixture
def compiles(caplog):
  """Names of the programs JAX compiles while the test runs."""
  import jax

  jax.config.update("jax_log_compiles", True)
  caplog.set_level(logging.WARNING)
  names = lambda: [
    r.getMessage().split(" ")[1]
    for r in caplog.records  # noqa: E731
    if r.getMessage().startswith("Compiling ")
  ]
  yield names
  jax.config.update("jax_log_compiles", False)


# Our programs: sampling, training, the feature networks; tiny eager ops are not among them.
OUR_PROGRAMS = ("sample", "train_fn", "<lambda>", "init", "step", "predict")


def assert_fails_cleanly(run, name, workdir, compiles):
  before = snapshot(workdir)
  with pytest.raises(errors.UserInputError) as caught:
    run()
  assert name in str(caught.value), (name, str(caught.value))
  assert snapshot(workdir) == before
  compiled = [n for n in compiles() if any(n.startswith(f"jit({p}") for p in OUR_PROGRAMS)]
  assert not compiled, compiled
  print(f"\nSWEEP | {name} | {str(caught.value)[:160]}")  # the table: pytest -s ... | grep SWEEP
  return str(caught.value)


@pytest.fixture(scope="module")
def eval_workdir(tmp_path_factory):
  """A workdir with a (random) classifier for 16x16 images and good eval inputs beside it."""
  workdir = str(tmp_path_factory.mktemp("eval"))
  model = feature_classifier.Classifier(
    feature_classifier.ClassifierConfig(16, 1, 10), rngs=nnx.Rngs(0)
  )
  feature_classifier.save(model, os.path.join(workdir, "feature_classifier.npz"))
  good = str(tmp_path_factory.mktemp("inputs"))
  np.savez(
    os.path.join(good, "samples.npz"),
    arr_0=np.random.default_rng(0).integers(0, 256, (200, 16, 16, 1), np.uint8),
  )
  return workdir, good


@pytest.mark.parametrize(
  "key, defect", EVAL_FILE_CASES, ids=[f"{k}-{d.__name__}" for k, d in EVAL_FILE_CASES]
)
def test_eval_input_files(eval_workdir, tmp_path, compiles, key, defect):
  workdir, good = eval_workdir
  config = tiny.get_config()
  config.eval.feature_net, config.eval.num_samples, config.eval.batch_size = "classifier", 136, 8
  config.eval.samples = os.path.join(good, "samples.npz")
  if key == "inception_weights":
    config.eval.feature_net, config.eval.num_samples = "inception", 4096
  bad = str(tmp_path / f"bad_{key}.npz")
  defect(bad)
  config.eval[key] = bad
  assert_fails_cleanly(
    lambda: cli.evaluate(cli.Arguments(config, workdir)), f"eval.{key}", workdir, compiles
  )


def diffusers_folder(path, defect):
  """A diffusers folder with a real config.json whose weights (or config) are broken."""
  from jax_ddpm.models import diffusers_weights as convert

  config = tiny.get_config()
  os.makedirs(path)
  with open(os.path.join(path, "config.json"), "w") as f:
    import json

    json.dump(convert.diffusers_config_from_unet(runs.build(config).unet), f)
  weights = os.path.join(path, "diffusion_pytorch_model.safetensors")
  if defect == "no weights file":
    return
  if defect == "config.json not JSON":
    not_an_archive(os.path.join(path, "config.json"))
    defect = "int tensors"
  from safetensors.numpy import save_file

  if defect in ("truncated weights", "int tensors"):
    save_file(
      {
        "conv_in.weight": np.zeros(
          (16, 1, 3, 3), np.int32 if defect == "int tensors" else np.float32
        )
      },
      weights,
    )
  if defect == "truncated weights":
    with open(weights, "rb") as f:
      data = f.read()
    with open(weights, "wb") as f:
      f.write(data[: len(data) // 2])
  if defect == "empty weights":
    empty(weights)
  if defect == "pickle as weights":
    pickle_file(weights)


DIFFUSERS_DEFECTS = [
  "no folder",
  "a file",
  "no weights file",
  "empty weights",
  "truncated weights",
  "pickle as weights",
  "config.json not JSON",
  "int tensors",
]


@pytest.mark.parametrize("defect", DIFFUSERS_DEFECTS)
def test_import_from_a_diffusers_folder(tmp_path, compiles, defect):
  folder = str(tmp_path / "unet")
  if defect == "a file":
    not_an_archive(folder)
  elif defect != "no folder":
    diffusers_folder(folder, defect)
  workdir = str(tmp_path / "run")
  os.makedirs(workdir)
  assert_fails_cleanly(
    lambda: cli.import_diffusers(cli.Arguments(tiny.get_config(), workdir, import_from=folder)),
    "--import_from",
    workdir,
    compiles,
  )


@pytest.mark.parametrize(
  "defect", [missing, a_directory, empty, not_an_archive, pickle_file], ids=lambda d: d.__name__
)
def test_import_from_a_torchscript_inception(tmp_path, compiles, defect):
  pytest.importorskip("torch")
  bad = str(tmp_path / "default_1.pt")
  defect(bad)
  output = str(tmp_path / "out")
  os.makedirs(output)
  assert_fails_cleanly(
    lambda: fid_weights.convert(bad, os.path.join(output, "w.npz")),
    "--import_from",
    output,
    compiles,
  )


def idx_directory(path, defect):
  os.makedirs(path)
  name = os.path.join(path, "train-images-idx3-ubyte")
  if defect == "empty IDX file":
    empty(name)
  elif defect == "IDX header and size disagree":
    with open(name, "wb") as f:
      f.write(
        b"\x00\x00\x08\x03" + (10).to_bytes(4, "big") + (16).to_bytes(4, "big") * 2 + bytes(100)
      )
  elif defect == "truncated .gz":
    import gzip

    data = gzip.compress(b"\x00\x00\x08\x03" + bytes(5000))
    with open(name + ".gz", "wb") as f:
      f.write(data[: len(data) // 2])
  elif defect == "not IDX":
    not_an_archive(name)


def image_folder(path, defect):
  os.makedirs(path)
  from PIL import Image

  Image.fromarray(np.zeros((16, 16), np.uint8)).save(os.path.join(path, "good.png"))
  if defect == "a .png that is no image":
    not_an_archive(os.path.join(path, "broken.png"))
  elif defect == "truncated .png":
    Image.fromarray(np.full((64, 64), 7, np.uint8)).save(os.path.join(path, "cut.png"))
    with open(os.path.join(path, "cut.png"), "rb") as f:
      data = f.read()
    with open(os.path.join(path, "cut.png"), "wb") as f:
      f.write(data[: len(data) // 2])
  elif defect == "no images":
    os.remove(os.path.join(path, "good.png"))
    not_an_archive(os.path.join(path, "notes.txt"))


DATA_CASES = (
  [
    ("idx", d)
    for d in [
      "no directory",
      "a file",
      "no IDX file",
      "empty IDX file",
      "IDX header and size disagree",
      "truncated .gz",
      "not IDX",
    ]
  ]
  + [
    ("folder", d)
    for d in ["no directory", "a file", "no images", "a .png that is no image", "truncated .png"]
  ]
  + [("tfds", d) for d in ["no directory", "a file", "dataset not prepared"]]
)


@pytest.mark.parametrize("source, defect", DATA_CASES, ids=[f"{s}-{d}" for s, d in DATA_CASES])
def test_data_paths(tmp_path, compiles, source, defect):
  config = tiny.get_config()
  config.data.source = source
  path = str(tmp_path / "data")
  if defect == "a file":
    not_an_archive(path)
  elif defect not in ("no directory",):
    os.makedirs(path) if source == "tfds" else (
      idx_directory(path, defect) if source == "idx" else image_folder(path, defect)
    )
  key = "data.data_dir" if source == "tfds" else "data.path"
  if source == "tfds":
    config.data.tfds_name, config.data.data_dir = "mnist", path
  else:
    config.data.path = path
  workdir = str(tmp_path / "run")
  os.makedirs(workdir)
  assert_fails_cleanly(lambda: runs.train(config, workdir), key, workdir, compiles)


def test_sixteen_bit_and_cmyk_images_are_read_scaled_not_clipped(tmp_path):
  from PIL import Image

  from jax_ddpm.data import sources as data_sources

  Image.fromarray(np.full((8, 8), 32896, np.uint16)).save(tmp_path / "a_16bit.png")  # 128/255
  Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "b_cmyk.jpg")  # pure red
  grey = data_sources.read_image_folder(str(tmp_path), 8, 1)
  assert grey[0].min() == grey[0].max() == 128
  rgb = data_sources.read_image_folder(str(tmp_path), 8, 3)
  red = rgb[1].reshape(-1, 3).mean(axis=0)
  assert red[0] > 240 and red[1] < 15 and red[2] < 15, red


def run_main(tmp_path, *flags):
  environment = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
  return subprocess.run(
    [
      sys.executable,
      os.path.join(ROOT, "main.py"),
      "--config=" + os.path.join(ROOT, "configs", "tiny.py"),
      f"--workdir={tmp_path / 'run'}",
      *flags,
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    env=environment,
    timeout=300,
  )


@pytest.mark.parametrize(
  "flags, message",
  [
    (["--config.sampling.sampler=x"], "Unknown sampling.sampler 'x'; allowed values"),
    (
      ["--mode=import", "--import_from=/nonexistent/unet"],
      "--import_from='/nonexistent/unet' does not exist",
    ),
  ],
  ids=["unknown sampler", "missing import folder"],
)
def test_the_command_line_prints_a_users_mistake_alone(tmp_path, flags, message):
  result = run_main(tmp_path, *flags)
  assert result.returncode == 1, result.stderr[-2000:]
  assert message in result.stderr, result.stderr[-2000:]
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  assert not (tmp_path / "run").exists() or not os.listdir(tmp_path / "run")
