"""The train step: one pure, jitted function of (state, batch), imported by no code that needs clu.

One step is DDPM Algorithm 1: x_0 from the data, t ~ U{0..T-1} (or by importance, or up to
max_timestep only: diffusion/timesteps.py), eps ~ N(0, I), a gradient step on the squared error
of the network's prediction (eq. 14's L_simple for an eps network, the same error against x_0 or
v for the others, weighted per timestep or replaced by the bound: diffusion/losses.py), then the
EMA of the parameters. A class-conditional model gets the batch's labels, each replaced by the
null label with probability label_dropout (Ho & Salimans 2022, Algorithm 1); a text model's labels
are caption indices, looked up as token ids, the null label's row the empty prompt. A latent
model's x_0 is the autoencoder's scaled latent of the batch, drawn afresh each step (Rombach et
al. 2022, Sec. 3.2: the diffusion model's data is z = E(x)). The batch is sharded
over the mesh's 'data' axis, the state replicated, and the step's random keys are the run's key
folded with the step, so a resumed run repeats an uninterrupted one exactly.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jax_ddpm.diffusion import guidance, timesteps
from jax_ddpm.diffusion.losses import training_losses
from jax_ddpm.diffusion.schedules import DiffusionSchedule
from jax_ddpm.runtime import mesh as mesh_lib
from jax_ddpm.training.state import TrainState


@dataclasses.dataclass(frozen=True)
class EMARule:
  """The weights' exponential moving average: ema <- d_t ema + (1 - d_t) params.

  d_t = decay, or with warmup min(decay, (1 + t) / (10 + t)) at step t (the original DDPM code's
  tf.train.ExponentialMovingAverage with num_updates), so early averages forget the random init.
  """

  decay: float
  warmup: bool

  def decay_at(self, step: jax.Array) -> jax.Array:
    decay = jnp.asarray(self.decay, jnp.float32)
    if self.warmup:
      step = jnp.asarray(step).astype(jnp.float32)
      decay = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
    return decay


@dataclasses.dataclass(frozen=True)
class StepOptions:
  """What one train step reads besides the schedule and the optimizer.

  prediction: what the network predicts (eps | x0 | v). ema: the EMA rule. learning_rate: the
  optimizer's schedule, reported in the step's metrics. num_classes: classes of a conditional
  model (None: unconditional). caption_tokens: a text model's token ids per caption index, the
  last row the empty prompt (None: no text). label_dropout: probability that a label is replaced
  by the null label. loss_weights: per-timestep weights of the squared error
  (losses.loss_weights), or None.
  learn_sigma, vlb_weight: the network also outputs its variance, trained by L_hybrid with
  lambda = vlb_weight. objective: simple | vlb. importance_sampling: t drawn by importance from
  the state's loss history, each example's loss weighted by 1 / (T p_t). max_timestep: t drawn
  from {0..max_timestep} (None: all T). inject_nonfinite_at_steps: a NaN loss at these steps
  (fault injection for the tests).
  """

  prediction: str
  ema: EMARule
  learning_rate: optax.Schedule
  num_classes: int | None = None
  caption_tokens: tuple[tuple[int, ...], ...] | None = None
  label_dropout: float = 0.0
  loss_weights: tuple[float, ...] | None = None
  learn_sigma: bool = False
  vlb_weight: float = 0.0
  objective: str = "simple"
  importance_sampling: bool = False
  max_timestep: int | None = None
  inject_nonfinite_at_steps: tuple[int, ...] = ()


def draw_timesteps(
  key: jax.Array, state: TrainState, batch_size: int, num_timesteps: int, options: StepOptions
):
  """(t [B], per-example loss weights): by importance from the state's history, or uniform over
  {0..T-1} (DDPM Algorithm 1, line 3), or over {0..max_timestep} (training.max_timestep)."""
  if options.importance_sampling:
    return timesteps.draw(key, state.timestep_history, batch_size)
  count = num_timesteps if options.max_timestep is None else options.max_timestep + 1
  return timesteps.uniform(key, batch_size, count), 1.0


def train_step(
  state: TrainState,
  batch: dict[str, jax.Array],
  *,
  graphdef: nnx.GraphDef,
  schedule: DiffusionSchedule,
  optimizer: optax.GradientTransformation,
  options: StepOptions,
  encode: Callable | None = None,
) -> tuple[TrainState, dict]:
  """One step of DDPM Algorithm 1 plus the EMA update; returns (new state, metrics).

  batch: {"image": [B, H, W, C]} and, for a conditional model, "label" [B]. encode(images, key):
  a latent model's first stage (x_0 = its scaled latent); None: x_0 is the image.
  """
  key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  t_key, eps_key, dropout_key = jax.random.split(key, 3)
  x0 = _data(batch, encode, jax.random.fold_in(key, 4))
  t, t_weights = draw_timesteps(t_key, state, x0.shape[0], schedule.num_timesteps, options)
  eps = jax.random.normal(eps_key, x0.shape, jnp.float32)
  y = _condition(_dropped_labels(batch, options, jax.random.fold_in(key, 3)), options)

  def loss_fn(params):
    model = nnx.merge(graphdef, params)
    rngs = nnx.Rngs(dropout=dropout_key)
    losses = training_losses(
      schedule,
      lambda x_t, t: model(x_t, t, y, rngs=rngs),
      x0,
      t,
      eps,
      options.prediction,
      options.loss_weights,
      learn_sigma=options.learn_sigma,
      vlb_weight=options.vlb_weight,
      objective=options.objective,
    )
    loss = jnp.mean(losses * t_weights)
    injected = options.inject_nonfinite_at_steps
    if injected:  # fault injection (tests): a NaN loss, hence NaN gradients, at these steps
      loss = jnp.where(jnp.isin(state.step, jnp.asarray(injected)), jnp.nan, loss)
    return loss, losses

  (loss, losses), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  grad_norm = optax.global_norm(grads)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  decay = options.ema.decay_at(state.step)
  ema_params = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  updated = {"params": params, "ema_params": ema_params, "opt_state": opt_state}
  if options.importance_sampling:
    updated["timestep_history"] = timesteps.record(state.timestep_history, t, losses)
  new_state = _updated_if_finite(state, finite, updated)
  metrics = {
    "loss": loss,
    "grad_norm": grad_norm,
    "learning_rate": options.learning_rate(state.step),
    "nonfinite": (~finite).astype(jnp.int32),
  }
  return new_state, metrics


def _updated_if_finite(state: TrainState, finite: jax.Array, updated: dict) -> TrainState:
  """The next state, its `updated` fields taken only if the step was finite.

  A non-finite loss or gradient would poison the weights and Adam's moments for good: such an
  update is withheld (both nonfinite policies) and counted; "halt" then stops the run on the host.
  """
  kept = {
    name: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, getattr(state, name))
    for name, new in updated.items()
  }
  return state.replace(
    step=state.step + 1, nonfinite_steps=state.nonfinite_steps + (~finite).astype(jnp.int32), **kept
  )


def _dropped_labels(batch: dict, options: StepOptions, key: jax.Array):
  """A conditional model's labels, each replaced by the null label with probability
  label_dropout (Ho & Salimans 2022, Algorithm 1); None for an unconditional model."""
  if options.num_classes is None:
    return None
  y = batch["label"]
  dropped = jax.random.bernoulli(key, options.label_dropout, y.shape)
  return jnp.where(dropped, guidance.null_label(options.num_classes), y)


def _data(batch: dict, encode: Callable | None, key: jax.Array) -> jax.Array:
  """x_0: the batch's images, or a latent model's draw of their scaled latents (frozen)."""
  if encode is None:
    return batch["image"]
  return jax.lax.stop_gradient(encode(batch["image"], key))


def _condition(y, options: StepOptions):
  """The network's condition: the labels, or a text model's prompt (ids, mask) per caption."""
  if y is None or options.caption_tokens is None:
    return y
  ids = jnp.asarray(options.caption_tokens, jnp.int32)[y]
  return ids, ids != 0


def make_train_fn(
  graphdef,
  schedule: DiffusionSchedule,
  optimizer: optax.GradientTransformation,
  options: StepOptions,
  mesh: jax.sharding.Mesh,
  *,
  steps_per_dispatch: int = 1,
  donate: bool = True,
  encode: Callable | None = None,
) -> Callable:
  """jit(state, batch) -> (state, metrics), k = steps_per_dispatch steps per call; encode: a
  latent model's first stage (train_step).

  For k > 1 the batch is [k, B, H, W, C] and the steps run in one lax.scan; metrics are [k].
  The incoming state's buffers are donated (`donate=False` keeps them, for benchmarks).
  """
  step = functools.partial(
    train_step,
    graphdef=graphdef,
    schedule=schedule,
    optimizer=optimizer,
    options=options,
    encode=encode,
  )
  k = steps_per_dispatch

  def train_fn(state, batch):
    if k == 1:
      return step(state, batch)
    return jax.lax.scan(step, state, batch)

  replicated = mesh_lib.replicated(mesh)
  return jax.jit(
    train_fn,
    donate_argnums=(0,) if donate else (),
    in_shardings=(replicated, mesh_lib.batch_sharding(mesh, int(k > 1))),
    out_shardings=(replicated, replicated),
  )
