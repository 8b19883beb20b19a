"""A small CNN classifier for small grayscale datasets, whose penultimate layer is a feature space.

On MNIST-like data the FID Inception is both a domain mismatch (ImageNet features of upscaled
digits) and slow on a CPU. Instead the project trains this classifier once on the labelled
training split and measures samples in its 128-d penultimate features: Frechet distance (the
FID formula, `metrics.frechet_distance`), a classifier score (the Inception Score formula on its
class probabilities) and the histogram of predicted labels (mode dropping shows up there first).
Numbers from it compare runs on the same dataset and classifier file; they are not FIDs.

Architecture: 3x3 convs (w, w) - avg pool 2 - (2w, 2w) - avg pool 2 - (4w) - global mean -
dense 128 (the features, after ReLU) - dense num_classes. Saved as `.npz`: parameters under
their dotted paths and the architecture as a JSON string under '__config__'.
"""

from __future__ import annotations

import dataclasses
import json
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils

from jax_ddpm.io import errors
from jax_ddpm.io import paths as files
from jax_ddpm.runtime import mesh as parallel

if TYPE_CHECKING:
  from jax_ddpm.config.sections import EvalConfig

FEATURE_DIM = 128
CONFIG_KEY = "__config__"


@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
  image_size: int
  channels: int
  num_classes: int
  width: int = 32


class Classifier(nnx.Module):
  """uint8 NHWC images -> (features [N, 128], logits [N, num_classes])."""

  def __init__(self, config: ClassifierConfig, *, rngs: nnx.Rngs):
    w = config.width
    self.config = config
    conv = lambda i, o: nnx.Conv(i, o, (3, 3), padding="SAME", rngs=rngs)
    self.conv_1, self.conv_2 = conv(config.channels, w), conv(w, w)
    self.conv_3, self.conv_4 = conv(w, 2 * w), conv(2 * w, 2 * w)
    self.conv_5 = conv(2 * w, 4 * w)
    self.features = nnx.Linear(4 * w, FEATURE_DIM, rngs=rngs)
    self.logits = nnx.Linear(FEATURE_DIM, config.num_classes, rngs=rngs)

  def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    x = images.astype(jnp.float32) / 127.5 - 1.0
    pool = lambda y: nnx.avg_pool(y, (2, 2), strides=(2, 2), padding="SAME")
    x = pool(jax.nn.relu(self.conv_2(jax.nn.relu(self.conv_1(x)))))
    x = pool(jax.nn.relu(self.conv_4(jax.nn.relu(self.conv_3(x)))))
    x = jnp.mean(jax.nn.relu(self.conv_5(x)), axis=(1, 2))
    features = jax.nn.relu(self.features(x))
    return features, self.logits(features)


def path_for(evaluation: EvalConfig, workdir: str) -> str:
  """The classifier file of a run: eval.classifier, or workdir/feature_classifier.npz."""
  return evaluation.classifier or files.join(workdir, "feature_classifier.npz")


def save(model: Classifier, path: str) -> None:
  """Writes the classifier's parameters and architecture as one `.npz` (atomically)."""
  arrays = {
    ".".join(str(k) for k in p): np.asarray(v.get_value())
    for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
  }
  arrays[CONFIG_KEY] = np.array(json.dumps(dataclasses.asdict(model.config)))
  files.save_npz(path, **arrays)


def load(path: str) -> Classifier:
  """The classifier saved at `path`; names the file and the problem when it does not fit."""
  data = files.read_npz(
    path,
    "eval.classifier",
    hint="Train one on the dataset's labelled training split first: "
    "python main.py --mode=train_classifier --config=... --workdir=...",
  )
  if CONFIG_KEY not in data:
    raise errors.InputFileError(
      f"eval.classifier={path!r} is not a feature classifier saved by "
      f"this project (no {CONFIG_KEY!r} entry)."
    )
  try:
    config = ClassifierConfig(**json.loads(str(data.pop(CONFIG_KEY))))
  except (TypeError, ValueError) as error:
    raise errors.InputFileError(
      f"eval.classifier={path!r}: unreadable architecture record {CONFIG_KEY!r}: {error}"
    ) from None
  arrays = data
  model = nnx.eval_shape(lambda: Classifier(config, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(model)
  flat = []
  for p, value in nnx.to_flat_state(state):
    name = ".".join(str(k) for k in p)
    if name not in arrays or arrays[name].shape != value.shape:
      raise errors.InputFileError(
        f"eval.classifier={path!r}: parameter {name} of shape {value.shape} is missing or has "
        f"another shape."
      )
    flat.append((p, value.replace(jnp.asarray(arrays[name]))))
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


def train(
  images: np.ndarray,
  labels: np.ndarray,
  *,
  num_steps: int,
  batch_size: int,
  seed: int,
  learning_rate: float = 3e-3,
  holdout_fraction: float = 0.1,
  width: int = 32,
) -> tuple[Classifier, dict[str, float]]:
  """Trains on labelled uint8 images; returns the model and accuracy on a held-out slice.

  A seeded `holdout_fraction` of the examples is held out of training to report accuracy.
  """
  if images.ndim != 4 or len(images) != len(labels):
    raise ValueError(
      f"Expected images [N, H, W, C] and labels [N]; got {images.shape} and {labels.shape}."
    )
  num_classes = int(labels.max()) + 1
  order = np.random.default_rng(seed).permutation(len(images))
  num_holdout = int(len(images) * holdout_fraction)
  holdout, keep = order[:num_holdout], order[num_holdout:]
  config = ClassifierConfig(images.shape[1], images.shape[3], num_classes, width)
  model = Classifier(config, rngs=nnx.Rngs(seed))
  optimizer = nnx.Optimizer(model, optax.adamw(learning_rate, weight_decay=1e-4), wrt=nnx.Param)
  # Data parallel like the diffusion model: weights replicated, the batch split over devices.
  mesh = parallel.data_mesh()
  parallel.check_divisible(batch_size, "eval.classifier_batch_size", mesh.size)
  nnx.update(
    (model, optimizer), jax.device_put(nnx.state((model, optimizer)), parallel.replicated(mesh))
  )
  batch_sharding = parallel.batch_sharding(mesh)

  @nnx.jit
  def step(model, optimizer, x, y):
    def loss_fn(model):
      _, logits = model(x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  rng = np.random.default_rng([seed, 1])
  in_flight = parallel.DispatchLimit()  # this loop reads no result for many steps
  for i in range(num_steps):
    batch = keep[rng.integers(0, len(keep), batch_size)]
    loss = step(
      model,
      optimizer,
      jax.device_put(images[batch], batch_sharding),
      jax.device_put(labels[batch], batch_sharding),
    )
    in_flight.add(loss)
    if (i + 1) % max(1, num_steps // 10) == 0:
      logging.info("Classifier step %d/%d: loss %.4f", i + 1, num_steps, float(loss))
  model = nnx.merge(*nnx.split(jax.device_get(model)))  # back to host memory, unsharded
  report = {"train_examples": float(len(keep)), "holdout_examples": float(num_holdout)}
  if num_holdout:
    report["holdout_accuracy"] = accuracy(model, images[holdout], labels[holdout])
  return model, report


def train_and_save(
  images: np.ndarray, labels: np.ndarray, path: str, *, num_steps: int, batch_size: int, seed: int
) -> dict[str, float]:
  """`train` on every process, then process 0 writes the classifier to `path` and every process
  waits for the file; returns train's report."""
  model, report = train(images, labels, num_steps=num_steps, batch_size=batch_size, seed=seed)
  if jax.process_index() == 0:
    save(model, path)
  if jax.process_count() > 1:  # every process then reads the file process 0 wrote
    multihost_utils.sync_global_devices("classifier saved")
  logging.info("Feature classifier saved to %s: %s", path, report)
  return report


def accuracy(model: Classifier, images: np.ndarray, labels: np.ndarray, batch: int = 500) -> float:
  predict = nnx.jit(lambda m, x: jnp.argmax(m(x)[1], axis=-1))
  correct = sum(
    int(
      np.sum(
        np.asarray(predict(model, jnp.asarray(images[i : i + batch]))) == labels[i : i + batch]
      )
    )
    for i in range(0, len(images), batch)
  )
  return correct / len(images)
