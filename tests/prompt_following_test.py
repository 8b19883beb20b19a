"""A trained text model's samples follow their prompts: the requested digit by a classifier, and
stroke thickness and slant by the code that wrote the training captions.

The model is configs/mnist_text.py trained for 4000 steps on both stages (tests/fixtures/
mnist_text.npz, written by make_text_fixture.py; docs/latent_text.md measures the same model on
720 samples). Forty prompts, four per digit, each asking for a thin or thick, upright or slanted
stroke, are sampled once at the config's guidance scale through the program every mode uses.
"""

import os

import jax
import numpy as np
import optax
import pytest
import runs

from configs import mnist_text
from jax_ddpm.config import builders
from jax_ddpm.data import captions
from jax_ddpm.evaluation import classifier, prompt_following
from jax_ddpm.models.autoencoder import Codec
from jax_ddpm.runtime import mesh as mesh_lib
from jax_ddpm.samplers import program
from jax_ddpm.training import state as state_lib

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "mnist_text.npz")
# Four prompts per digit at the ends of both properties: 40 images, a batch 8 devices divide.
PROMPTS = [
  captions.caption(label, thick, slanted)
  for label in range(10)
  for thick in (0, 2)
  for slanted in (0, 2)
]


def with_leaves(tree, arrays, prefix):
  """`tree` with its leaves replaced, in order, by the fixture's float16 arrays as float32."""
  leaves, structure = jax.tree.flatten(tree)
  stored = [arrays[f"{prefix}_{i:04d}"] for i in range(len(leaves))]
  assert [a.shape for a in stored] == [leaf.shape for leaf in leaves]
  return jax.tree.unflatten(structure, [np.asarray(a, np.float32) for a in stored])


@pytest.fixture(scope="module")
def drawn(tmp_path_factory):
  """The forty prompts' samples (uint8) and the fixture's arrays."""
  arrays = dict(np.load(FIXTURE, allow_pickle=False))
  config = mnist_text.get_config()
  config.sampling.prompts = "; ".join(PROMPTS)
  config.sampling.batch_size = len(PROMPTS)
  run = runs.build(config)
  mesh = mesh_lib.data_mesh()
  network = builders.autoencoder_config(run.config)
  graphdef, ae_state = state_lib.create_autoencoder_state(network, 0, optax.adam(1e-3), mesh)
  codec = Codec(
    network,
    graphdef,
    with_leaves(ae_state.params, arrays, "autoencoder"),
    float(arrays["scale_factor"]),
  )
  _, eval_graphdef, state = state_lib.create_train_state(run.network, 0, mesh, run.optimizer)
  params = with_leaves(state.ema_params, arrays, "model")
  sample_fn = program.make_sample_fn(
    eval_graphdef,
    run.schedule,
    (len(PROMPTS), *run.sample_shape),
    mesh,
    run.sampler,
    run.sampling_options,
    decode=codec.decode,
  )
  images, labels = program.draw_batch(sample_fn, params, jax.random.key(0), 0)
  assert [PROMPTS[i] for i in labels] == PROMPTS
  return images, arrays, tmp_path_factory.mktemp("classifier")


def test_samples_of_a_trained_text_model_follow_their_prompts(drawn):
  images, arrays, directory = drawn
  path = str(directory / "classifier.npz")
  np.savez(
    path, **{k[len("classifier/") :]: v for k, v in arrays.items() if k.startswith("classifier/")}
  )
  digits = classifier.load(path)
  predicted = np.asarray(digits(images)[1]).argmax(-1)
  bins = captions.CaptionBins(
    tuple(arrays["thickness_edges"].tolist()), tuple(arrays["slant_edges"].tolist())
  )
  found = prompt_following.measure(images, PROMPTS, predicted, bins)
  print(found)
  # 720 samples of all 90 captions at w = 3: accuracy 1.000, r 0.937 and 0.952.
  assert found.label_accuracy >= 0.9
  assert found.thickness.correlation >= 0.7 and found.slant.correlation >= 0.7
  assert found.thickness.level_accuracy >= 0.7 and found.slant.level_accuracy >= 0.7
  thin, _, thick = found.thickness.mean_by_level
  upright, _, slanted = found.slant.mean_by_level
  assert thick > thin + 1.0 and slanted > upright + 20.0
