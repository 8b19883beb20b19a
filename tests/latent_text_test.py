"""Latent diffusion with text prompts, end to end on tiny networks: the autoencoder as its own
stage (checkpoints with their scale factor, summaries, reconstructions, resume), a text model
trained on its latents with the digits' captions, sample mode writing each image's prompt, the
Python API drawing the same images from prompts, the measures of prompt following, and every
bad input refused by name before anything is compiled."""

import glob
import os
import shutil

import jax
import numpy as np
import pytest
import runs

import jax_ddpm
from configs import mnist_text
from jax_ddpm import cli
from jax_ddpm.config import builders
from jax_ddpm.data import captions, sources
from jax_ddpm.evaluation import prompt_following, report
from jax_ddpm.io.errors import ConfigError, MissingInputError
from jax_ddpm.training import autoencoder, checkpointing, loop

PROMPTS = "a thick seven; an upright two"


def tiny_text_config(autoencoder_dir: str = ""):
  """configs/mnist_text.py shrunk to seconds: an 8-wide autoencoder and U-Net, a one-layer text
  encoder, 100 timesteps."""
  config = mnist_text.get_config()
  ae = config.autoencoder
  ae.checkpoint, ae.ch, ae.num_groups = autoencoder_dir, 8, 4
  ae.num_train_steps, ae.batch_size, ae.log_every_steps, ae.checkpoint_every_steps = 3, 16, 1, 2
  ae.heldout_images, ae.scale_images = 16, 64
  config.diffusion.num_timesteps = 100
  model = config.model
  model.ch, model.num_groups, model.text_width, model.text_depth, model.text_heads = 8, 4, 16, 1, 2
  training = config.training
  training.batch_size, training.num_train_steps, training.eval_every_steps = 8, 2, 0
  training.log_every_steps = training.checkpoint_every_steps = training.sample_every_steps = 2
  training.num_sample_images, training.sample_ddim_steps = 10, 4
  config.sampling.num_steps, config.sampling.guidance_scale = 4, 2.0
  config.sampling.batch_size, config.sampling.num_samples = 8, 40
  config.sampling.prompts = PROMPTS
  return config


def train_autoencoder(config, workdir):
  typed = runs.typed(config)
  return autoencoder.train_and_save(typed, builders.autoencoder_config(typed), workdir)


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
  """The autoencoder trained 3 steps straight, the same interrupted at step 2 and resumed, and
  a text model trained 2 steps on the straight one's latents."""
  straight = str(tmp_path_factory.mktemp("autoencoder"))
  train_autoencoder(tiny_text_config(), straight)
  resumed = str(tmp_path_factory.mktemp("resumed") / "run")
  shutil.copytree(straight, resumed)
  shutil.rmtree(os.path.join(resumed, "checkpoints", "3"))
  train_autoencoder(tiny_text_config(), resumed)
  text = str(tmp_path_factory.mktemp("text"))
  runs.train(tiny_text_config(straight), text)
  return straight, resumed, text


def test_the_autoencoder_stage_saves_its_scale_factor_summaries_and_reconstructions(stages):
  straight, resumed, _ = stages
  reader = checkpointing.Checkpointer(straight, create=False)
  meta = reader.read_meta(3)
  assert reader.all_steps() == [2, 3]
  reader.close()
  assert meta["autoencoder"]["z_channels"] == 2 and 0 < meta["scale_factor"] < 100
  assert glob.glob(os.path.join(straight, "events.out.tfevents.*"))
  assert os.path.exists(os.path.join(straight, "samples", "reconstructions.png"))
  network = builders.autoencoder_config(runs.typed(tiny_text_config()))
  codecs = [checkpointing.load_codec(d, network) for d in (straight, resumed)]
  assert codecs[0].scale_factor == codecs[1].scale_factor
  for a, b in zip(jax.tree.leaves(codecs[0].params), jax.tree.leaves(codecs[1].params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # resumed == straight, bitwise


def test_a_preemption_notice_saves_the_autoencoders_step_in_flight(tmp_path, monkeypatch):
  class NoticeAtStep2:
    def reached(self, step):
      return step == 2

    def close(self):
      pass

  monkeypatch.setattr(autoencoder, "PreemptionWatch", NoticeAtStep2)
  config = tiny_text_config()
  config.autoencoder.checkpoint_every_steps = 3  # step 2 is saved for the notice alone
  result = train_autoencoder(config, str(tmp_path))
  assert "heldout_mse" not in result
  reader = checkpointing.Checkpointer(str(tmp_path), create=False)
  assert reader.all_steps() == [2] and reader.read_meta(2)["scale_factor"] > 0
  reader.close()
  monkeypatch.undo()
  assert train_autoencoder(config, str(tmp_path))["heldout_mse"] > 0


def test_sample_mode_decodes_latents_and_writes_each_images_prompt(stages):
  config = tiny_text_config(stages[0])
  directory = cli.sample(cli.Arguments(config, stages[2]))
  assert os.path.basename(directory).startswith("2_ddim_4_none_w2_p")
  written = np.load(os.path.join(directory, "samples_40x28x28x1.npz"), allow_pickle=False)
  assert sorted(written.files) == ["arr_0", "labels", "prompts"]
  assert list(written["prompts"][:4]) == ["a thick seven", "an upright two"] * 2
  np.testing.assert_array_equal(written["labels"], [0, 1] * 20)
  assert written["arr_0"].dtype == np.uint8 and written["arr_0"].shape == (40, 28, 28, 1)


def test_eval_scores_a_text_models_samples_on_the_digits_their_prompts_ask_for(stages):
  config = tiny_text_config(stages[0])
  directory = cli.sample(cli.Arguments(config, stages[2]))
  config.eval.samples = os.path.join(directory, "samples_40x28x28x1.npz")
  config.eval.num_samples = 40
  _, labels = report.given_samples(runs.build(config))
  np.testing.assert_array_equal(labels, [7, 2] * 20)  # "a thick seven; an upright two"


def test_the_api_draws_from_prompts_what_sample_mode_writes(stages):
  config = tiny_text_config(stages[0])
  assert config.sampling.batch_size == 8  # the API's batch for two prompts on 8 devices
  written = np.load(
    os.path.join(cli.sample(cli.Arguments(config, stages[2])), "samples_40x28x28x1.npz")
  )["arr_0"]
  model = jax_ddpm.load(stages[2])
  drawn = model.sample(prompts=[p.strip() for p in PROMPTS.split(";")] * 4, guidance_scale=2.0)
  np.testing.assert_array_equal(drawn, written[:8])


def test_visualize_refuses_a_latent_run_by_name(stages):
  with pytest.raises(ConfigError, match=r"--mode=visualize draws .* a latent run"):
    cli.visualize(cli.Arguments(tiny_text_config(stages[0]), stages[2]))


def test_caption_tokens_give_each_caption_index_its_words_and_the_null_row_the_empty_prompt():
  config = runs.typed(tiny_text_config())
  table = np.array(builders.caption_tokens(config))
  assert table.shape == (captions.NUM_CAPTIONS + 1, config.model.max_tokens)
  words = builders.tokenizer(config).words
  row = table[captions.caption_index(7, 2, 2)]
  assert " ".join(words[i - 2] for i in row if i > 1) == "a thick slanted seven"
  np.testing.assert_array_equal(table[-1], [1] + [0] * (config.model.max_tokens - 1))


def test_captioned_sources_label_each_digit_with_its_own_caption():
  data = runs.typed(tiny_text_config()).data
  digits = sources.create_source(data, labels=True)
  images, labels = digits.read_labelled(np.arange(300))
  bins = captions.CaptionBins.from_images(images)
  _, indices = captions.CaptionedSource(digits, bins).read_labelled(np.arange(300))
  assert [captions.all_captions()[i] for i in indices] == captions.captions(images, labels, bins)


def test_prompt_following_scores_digits_against_their_own_captions_and_others():
  images, labels = sources.read_labelled(runs.typed(tiny_text_config()).data, "train")
  bins = captions.CaptionBins.from_images(images)
  own = prompt_following.measure(images, captions.captions(images, labels, bins), labels, bins)
  assert own.label_accuracy == 1.0
  assert own.thickness.level_accuracy == own.slant.level_accuracy == 1.0
  assert own.thickness.correlation > 0.7 and own.slant.correlation > 0.7
  assert own.thickness.mean_by_level[0] < own.thickness.mean_by_level[2]
  shuffled = np.random.default_rng(0).permutation(len(images))
  other = prompt_following.measure(
    images, captions.captions(images[shuffled], labels[shuffled], bins), labels, bins
  )
  assert other.label_accuracy < 0.2 and abs(other.thickness.correlation) < 0.1
  assert abs(other.slant.correlation) < 0.1 and other.slant.level_accuracy < 0.4


@pytest.mark.parametrize(
  "change, error, message",
  [
    (
      {"model.prompts": False, "sampling.prompts": "a seven", "sampling.guidance_scale": 1.0},
      ConfigError,
      r"sampling.prompts='a seven' asks for prompts, but the model has no text",
    ),
    (
      {"sampling.prompts": "a purple seven"},
      ConfigError,
      r"sampling.prompts: prompt 'a purple seven': unknown word\(s\) \['purple'\]",
    ),
    (
      {"sampling.prompts": "a one; a two; a three"},
      ConfigError,
      r"sampling.batch_size=8 must be a multiple of the 3 prompts",
    ),
    ({"data.random_flip": True}, ConfigError, r"a mirrored digit leans the other way"),
    ({"eval.bits_per_dim": True}, ConfigError, r"eval.bits_per_dim=True bounds the likelihood"),
    ({"sampling.thresholding": "static"}, ConfigError, r"set sampling.thresholding='none'"),
    ({"model.max_tokens": 4}, ConfigError, r"model.max_tokens=4 cannot hold the longest caption"),
    ({"autoencoder.ch_mult": (1, 2, 2, 2)}, ConfigError, r"image_size=28 must be divisible by"),
    (
      {"autoencoder.checkpoint": "MISSING"},
      MissingInputError,
      r"autoencoder.checkpoint='.*missing' holds no checkpoint .*--mode=train_autoencoder",
    ),
    (
      {"autoencoder.ch": 16},
      checkpointing.IncompatibleCheckpointError,
      r"autoencoder.ch: config 16 vs checkpoint 8[\s\S]*Use another autoencoder.checkpoint",
    ),
  ],
)
def test_bad_text_or_latent_input_fails_by_name_before_compiling(
  stages, tmp_path, monkeypatch, change, error, message
):
  config = tiny_text_config(stages[0])
  for key, value in change.items():
    section, name = key.split(".")
    if value == "MISSING":
      value = str(tmp_path / "missing")
    config[section][name] = value

  def no_model_yet(*args, **kwargs):
    raise AssertionError("the model was built (and compiled) before the input was checked")

  monkeypatch.setattr(loop, "create_train_state", no_model_yet)
  with pytest.raises(error, match=message):
    runs.train(config, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run" / "checkpoints")
