"""How the train step draws its timesteps: uniformly, or by importance for L_vlb.

Uniform: t ~ U{0..T-1} (DDPM Algorithm 1, line 3). Importance (Nichol & Dhariwal 2021,
Sec. 3.3, eq. 18): L_vlb = E_{t ~ p_t}[L_t / p_t] with p_t proportional to sqrt(E[L_t^2]),
E[L_t^2] estimated from the last HISTORY values of L_t seen for each t. Until every t has HISTORY
values, t stays uniform (their warm-up); afterwards a share UNIFORM_SHARE of p is spread evenly
so that no t's probability reaches 0 (the value of their released code's `uniform_prob`). The
train step multiplies example i's loss by w_i = 1 / (T p_{t_i}), which keeps the loss an
unbiased estimate of the uniform mean: E_p[w L_t] = (1/T) sum_t L_t.

The history lives in the TrainState (`TimestepHistory`), so it is checkpointed with the weights
and a resumed run draws as an uninterrupted one.
"""

from __future__ import annotations

import enum

import flax.struct
import jax
import jax.numpy as jnp


class TimestepSampling(str, enum.Enum):
  """How the train step draws t."""

  UNIFORM = "uniform"  # DDPM Algorithm 1
  IMPORTANCE = "importance"  # Improved DDPM Sec. 3.3, eq. 18


def uniform(rng: jax.Array, batch_size: int, num_timesteps: int) -> jnp.ndarray:
  """t ~ Uniform({0, ..., T-1}) for each example (DDPM Algorithm 1, line 3)."""
  return jax.random.randint(rng, (batch_size,), 0, num_timesteps, dtype=jnp.int32)


HISTORY = 10  # L_t values kept per timestep (Improved DDPM Sec. 3.3)
UNIFORM_SHARE = 1e-3


@flax.struct.dataclass
class TimestepHistory:
  """The last HISTORY per-example losses seen at each timestep, newest last once full."""

  losses: jax.Array  # float32 [T, HISTORY]
  counts: jax.Array  # int32 [T]: values stored, at most HISTORY


def empty_history(num_timesteps: int) -> TimestepHistory:
  return TimestepHistory(
    losses=jnp.zeros((num_timesteps, HISTORY), jnp.float32),
    counts=jnp.zeros((num_timesteps,), jnp.int32),
  )


def probabilities(history: TimestepHistory) -> jax.Array:
  """p_t [T]: uniform during the warm-up, else sqrt(E[L_t^2]) normalised, mixed with uniform."""
  num_timesteps = history.counts.shape[0]
  uniform = jnp.full((num_timesteps,), 1.0 / num_timesteps, jnp.float32)
  root_mean_square = jnp.sqrt(jnp.mean(jnp.square(history.losses), axis=1))
  weighted = root_mean_square / jnp.maximum(jnp.sum(root_mean_square), 1e-30)
  p = (1.0 - UNIFORM_SHARE) * weighted + UNIFORM_SHARE * uniform
  return jnp.where(jnp.all(history.counts == HISTORY), p, uniform)


def draw(key: jax.Array, history: TimestepHistory, batch_size: int):
  """(t [B] int32, w [B] float32 = 1 / (T p_t)): timesteps by importance and their weights."""
  p = probabilities(history)
  t = jax.random.choice(key, p.shape[0], (batch_size,), p=p).astype(jnp.int32)
  return t, 1.0 / (p.shape[0] * p[t])


def record(history: TimestepHistory, t: jax.Array, losses: jax.Array) -> TimestepHistory:
  """The history after the batch's (t_i, L_{t_i}), taken in batch order: a full row drops its
  oldest value."""

  def push(state, example):
    table, counts = state
    t_i, loss = example
    row, count = table[t_i], counts[t_i]
    full = count == HISTORY
    shifted = jnp.roll(row, -1).at[HISTORY - 1].set(loss)
    filled = row.at[jnp.minimum(count, HISTORY - 1)].set(loss)
    table = table.at[t_i].set(jnp.where(full, shifted, filled))
    return (table, counts.at[t_i].set(jnp.minimum(count + 1, HISTORY))), None

  (table, counts), _ = jax.lax.scan(
    push, (history.losses, history.counts), (t, losses.astype(jnp.float32))
  )
  return TimestepHistory(losses=table, counts=counts)
