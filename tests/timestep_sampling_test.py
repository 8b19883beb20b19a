"""How the train step draws t: importance-sampled for L_vlb (Improved DDPM Sec. 3.3) with its
checkpointed history, or uniform up to training.max_timestep."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import runs

from configs import tiny
from jax_ddpm.diffusion import timesteps as timestep_sampling
from jax_ddpm.io import errors
from jax_ddpm.runtime import mesh as parallel
from jax_ddpm.training import checkpointing, loop, state
from jax_ddpm.training import step as train

K = timestep_sampling.HISTORY


def _reference_record(losses, counts, pairs):
  """Improved DDPM's released update, one (t, loss) at a time, in numpy."""
  losses, counts = losses.copy(), counts.copy()
  for t, loss in pairs:
    if counts[t] == K:
      losses[t, :-1] = losses[t, 1:]
      losses[t, -1] = loss
    else:
      losses[t, counts[t]] = loss
      counts[t] += 1
  return losses, counts


def test_record_keeps_each_timesteps_last_ten_losses_in_batch_order():
  rng = np.random.default_rng(0)
  history = timestep_sampling.empty_history(4)
  losses, counts = np.zeros((4, K), np.float32), np.zeros(4, np.int32)
  for _ in range(5):  # repeated timesteps in one batch, rows that fill up and then roll
    t = rng.integers(0, 4, 8)
    values = rng.uniform(size=8).astype(np.float32)
    history = jax.jit(timestep_sampling.record)(
      history, jnp.asarray(t, jnp.int32), jnp.asarray(values)
    )
    losses, counts = _reference_record(losses, counts, zip(t, values))
  np.testing.assert_array_equal(np.asarray(history.losses), losses)
  np.testing.assert_array_equal(np.asarray(history.counts), counts)
  assert counts.max() == K  # some row did roll over


def test_probabilities_are_uniform_until_every_timestep_has_ten_losses():
  history = timestep_sampling.empty_history(5)
  full = np.tile(np.arange(1.0, 6.0, dtype=np.float32)[:, None], (1, K))
  warm = history.replace(losses=jnp.asarray(full), counts=jnp.full((5,), K).at[2].set(K - 1))
  np.testing.assert_allclose(timestep_sampling.probabilities(warm), np.full(5, 0.2))
  ready = warm.replace(counts=jnp.full((5,), K, jnp.int32))
  rms = np.sqrt(np.mean(full.astype(np.float64) ** 2, axis=1))  # eq. (18): sqrt(E[L_t^2])
  expected = (1 - timestep_sampling.UNIFORM_SHARE) * rms / rms.sum() + (
    timestep_sampling.UNIFORM_SHARE / 5
  )
  np.testing.assert_allclose(timestep_sampling.probabilities(ready), expected, rtol=1e-6)


def test_draws_follow_p_and_their_weights_make_the_loss_unbiased():
  history = timestep_sampling.TimestepHistory(
    losses=jnp.asarray(np.tile(np.array([1.0, 2.0, 4.0, 8.0], np.float32)[:, None], (1, K))),
    counts=jnp.full((4,), K, jnp.int32),
  )
  p = np.asarray(timestep_sampling.probabilities(history), np.float64)
  t, w = jax.jit(timestep_sampling.draw, static_argnums=2)(jax.random.key(0), history, 200_000)
  t, w = np.asarray(t), np.asarray(w, np.float64)
  frequencies = np.bincount(t, minlength=4) / t.size
  np.testing.assert_allclose(frequencies, p, atol=5 * np.sqrt(p * (1 - p) / t.size).max())
  np.testing.assert_allclose(w, 1.0 / (4 * p[t]), rtol=1e-6)
  per_t_loss = np.array([3.0, -1.0, 0.5, 7.0])  # E_p[w L_t] = (1/T) sum_t L_t
  standard_error = np.std(w * per_t_loss[t]) / np.sqrt(t.size)
  assert abs(np.mean(w * per_t_loss[t]) - per_t_loss.mean()) < 5 * standard_error


def _importance_config():
  config = tiny.get_config()
  config.model.learn_sigma = True
  config.training.objective = "vlb"
  config.training.timestep_sampling = "importance"
  return config


@pytest.mark.parametrize(
  "change,message",
  [
    ({"training.timestep_sampling": "importance"}, "set training.objective='vlb'"),
    ({"training.objective": "vlb", "model.learn_sigma": False}, "set model.learn_sigma=True"),
    ({"training.objective": "vlb", "training.loss_weighting": "min_snr"}, "use 'uniform'"),
    ({"training.objective": "bound"}, "Unknown training.objective"),
  ],
)
def test_inconsistent_objective_and_timestep_sampling_are_refused(change, message):
  config = tiny.get_config()
  config.model.learn_sigma = True
  for key, value in change.items():
    section, name = key.split(".")
    config[section][name] = value
  with pytest.raises(errors.ConfigError, match=message):
    runs.build(config)


def test_max_timestep_limits_the_uniform_draw_to_its_range():
  key = jax.random.key(4)
  options = train.StepOptions(prediction="eps", ema=None, learning_rate=None, max_timestep=7)
  t, weights = train.draw_timesteps(key, None, 20000, 100, options)
  assert set(np.asarray(t).tolist()) == set(range(8)) and weights == 1.0
  # The same draw as DDPM Algorithm 1's uniform t over a range of max_timestep + 1 values.
  np.testing.assert_array_equal(t, timestep_sampling.uniform(key, 20000, 8))
  every, _ = train.draw_timesteps(
    key, None, 20000, 100, dataclasses.replace(options, max_timestep=None)
  )
  assert np.asarray(every).min() == 0 and np.asarray(every).max() == 99


def _mnist_with_max_timestep(**changes):
  from configs import mnist

  config = mnist.get_config()
  config.training.max_timestep = 800  # quadratic spacing's start, 0.8 T
  for key, value in changes.items():
    section, name = key.split(".")
    config[section][name] = value
  return config


@pytest.mark.parametrize(
  "changes,message",
  [
    (
      {"training.max_timestep": 0},
      r"training.max_timestep must be None \(every t\) or an "
      r"integer in 1..999 \(T - 1\), got 0",
    ),
    ({"training.max_timestep": 1000}, r"integer in 1..999 \(T - 1\), got 1000"),
    (
      {"sampling.spacing": "uniform"},
      r"sampling.sampler='sde_dpmpp_2m' on sampling.spacing="
      r"'uniform' starts at t = 980, above "
      r"training.max_timestep=800",
    ),
    ({"sampling.sampler": "ddpm"}, r"sampling.sampler='ddpm' on .* starts at t = 999"),
    # Sampler and grid on uniform spacing: 4 steps start at t = 750, 50 steps at t = 980.
    (
      {"sampling.spacing": "uniform", "sampling.num_steps": 4, "training.eval_num_steps": 4},
      r"The sample grid's DDIM-50 \(training.sample_ddim_steps\) on sampling.spacing='uniform' "
      r"starts at t = 980",
    ),
    (
      {
        "sampling.spacing": "uniform",
        "sampling.num_steps": 4,
        "training.sample_ddim_steps": 4,
        "training.eval_num_steps": 50,
      },
      r"The in-training measurement's sampler at training.eval_num_steps=50 starts at t = 980",
    ),
    (
      {"model.learn_sigma": True},
      r"L_vlb \(training.objective='vlb', or L_hybrid with "
      r"model.learn_sigma\) sums all T of them",
    ),
  ],
)
def test_max_timestep_is_refused_where_a_sampler_or_the_bound_needs_higher_t(changes, message):
  loop.check_machine(runs.build(_mnist_with_max_timestep()), parallel.data_mesh())
  with pytest.raises(errors.ConfigError, match=message):
    runs.build(_mnist_with_max_timestep(**changes))


@functools.cache
def _importance_run():
  """(train_fn, fresh state, batches, mesh) of the tiny learned-variance L_vlb model."""
  run = runs.build(_importance_config())
  mesh = parallel.data_mesh()
  graphdef, _, fresh = state.create_train_state(
    run.unet, run.config.seed, mesh, run.optimizer, run.history_timesteps
  )
  train_fn = train.make_train_fn(
    graphdef, run.schedule, run.optimizer, run.step_options, mesh, donate=False
  )
  images = np.random.default_rng(0).integers(0, 256, (4, 8, 16, 16, 1)) / 127.5 - 1.0
  batches = [
    {"image": jax.device_put(b.astype(np.float32), parallel.batch_sharding(mesh))} for b in images
  ]
  return train_fn, fresh, batches, mesh


def test_a_run_with_importance_sampling_records_every_examples_loss():
  train_fn, current, batches, _ = _importance_run()
  for batch in batches:
    current, metrics = train_fn(current, batch)
    assert np.isfinite(float(metrics["loss"]))
  counts = np.asarray(current.timestep_history.counts)
  assert counts.sum() == 4 * 8  # 4 steps of 8 examples, no row full yet (T = 100)
  recorded = np.asarray(current.timestep_history.losses)[counts > 0, 0]
  assert np.all(recorded > 0)  # L_vlb terms in bits/dim are positive


def test_the_loss_history_survives_a_checkpoint_and_older_checkpoints_still_restore(tmp_path):
  train_fn, current, batches, _ = _importance_run()
  for batch in batches[:2]:
    current, _ = train_fn(current, batch)
  saver = checkpointing.Checkpointer(str(tmp_path))
  saver.save(1, current.replace(timestep_history=None), {})  # as a run without the option
  saver.save(2, current, {})
  saver.close()
  saver = checkpointing.Checkpointer(str(tmp_path), create=False)  # a new process's reader
  fresh = _importance_run()[1]
  restored = saver.restore(2, fresh)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(current)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  without = saver.restore(1, fresh)  # no history on disk: it starts empty, weights restored
  assert int(np.asarray(without.timestep_history.counts).sum()) == 0
  np.testing.assert_array_equal(
    np.asarray(jax.tree.leaves(without.params)[0]), np.asarray(jax.tree.leaves(current.params)[0])
  )
  dropped = saver.restore(2, fresh.replace(timestep_history=None))  # sampling: not wanted
  assert dropped.timestep_history is None
  saver.close()
  resumed, straight = restored, current
  for batch in batches[2:]:  # a resumed run draws the same timesteps as an uninterrupted one
    resumed, _ = train_fn(resumed, batch)
    straight, _ = train_fn(straight, batch)
  np.testing.assert_array_equal(
    np.asarray(resumed.timestep_history.losses), np.asarray(straight.timestep_history.losses)
  )
