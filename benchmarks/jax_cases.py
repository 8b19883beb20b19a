"""One JAX measurement per process: a train step, a sampler, or the matmul ceiling.

benchmarks/run.py starts this module once per table row, so that each row has its own peak RSS,
compile caches and XLA device count:

  python -m benchmarks.jax_cases '{"kind": "train", "model": "small", "batch": 32}'

The last line printed is the result as JSON. Train batches come from the real input pipeline
(the offline MNIST digits) for the small model and from the "fake" source for the CIFAR-10 model,
so that "data wait" is measured where real data exists.
"""

import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks import common
from jax_ddpm.config import builders, run_config
from jax_ddpm.data import pipeline as input_pipeline
from jax_ddpm.data import sources as data_sources
from jax_ddpm.runtime import mesh as parallel
from jax_ddpm.samplers import program as sampling
from jax_ddpm.training import state
from jax_ddpm.training import step as train


def model_config(spec: dict):
  return common.model_config(spec["model"], spec.get("set"))


def build(config) -> builders.Run:
  return builders.build(run_config.from_config_dict(config))


def compiled_costs(compiled, num_devices: int) -> dict:
  """Total FLOPs (XLA's cost analysis is per device) and per-device memory of a program."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  memory = compiled.memory_analysis()
  per_device = (
    memory.argument_size_in_bytes
    + memory.output_size_in_bytes
    + memory.temp_size_in_bytes
    - memory.alias_size_in_bytes
  )
  return {"flops": float(cost.get("flops", 0.0)) * num_devices, "xla_memory_mb": per_device / 2**20}


def measure_train(spec: dict) -> dict:
  config = model_config(spec)
  k = int(spec.get("steps_per_dispatch", 1))
  with config.unlocked():
    config.training.batch_size = spec["batch"]
    config.training.steps_per_dispatch = k
    if spec["model"] != "small":
      config.data.source = "fake"
  mesh = parallel.data_mesh()
  run = build(config)
  train_graphdef, _, train_state = state.create_train_state(
    run.unet, config.seed, mesh, run.optimizer
  )
  train_fn = train.make_train_fn(
    train_graphdef,
    run.schedule,
    run.optimizer,
    run.step_options,
    mesh,
    steps_per_dispatch=k,
    donate=spec.get("donate", True),
  )
  batches = input_pipeline.BatchIterator(
    data_sources.create_source(run.config.data),
    first_step=0,
    global_batch=spec["batch"],
    seed=0,
    random_flip=config.data.random_flip,
    sharding=parallel.batch_sharding(mesh, int(k > 1)),
    steps_per_dispatch=k,
  )
  try:
    batch = next(batches)
    started = time.perf_counter()
    compiled = train_fn.lower(train_state, batch).compile()
    compile_s = time.perf_counter() - started
    costs = compiled_costs(compiled, mesh.size)
    if k > 1:
      costs["flops"] = None  # a scan's cost analysis does not say how often its body runs
    holder = {"state": train_state}
    waits = []

    def one_dispatch():
      waited = time.perf_counter()
      batch = next(batches)
      waits.append(time.perf_counter() - waited)
      holder["state"], metrics = train_fn(holder["state"], batch)
      jax.block_until_ready(metrics["loss"])

    median, low, high = common.time_call(one_dispatch, spec["repeats"], warmup=2)
  finally:
    batches.close()
  timed_waits = waits[2:]
  return dict(
    costs,
    compile_s=compile_s,
    seconds=[median / k, low / k, high / k],
    data_wait=float(np.sum(timed_waits)) / (median * len(timed_waits)),
    params=state_param_count(train_state),
    devices=mesh.size,
    peak_rss_mb=common.peak_rss_mb(),
  )


def state_param_count(train_state) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(train_state.params)))


def measure_sample(spec: dict) -> dict:
  config = model_config(spec)
  mesh = parallel.data_mesh()
  config.sampling.sampler, config.sampling.num_steps = spec["sampler"], spec["steps"]
  run = build(config)
  _, eval_graphdef, train_state = state.create_train_state(
    run.unet, config.seed, mesh, run.optimizer
  )
  shape = (spec["batch"], *run.image_shape)
  sample_fn = sampling.make_sample_fn(eval_graphdef, run.schedule, shape, mesh, run.sampler)
  params = train_state.ema_params
  started = time.perf_counter()
  compiled = sample_fn.lower(params, jax.random.key(0)).compile()
  compile_s = time.perf_counter() - started
  memory = compiled_costs(compiled, mesh.size)["xla_memory_mb"]
  forward_flops = _forward_flops(eval_graphdef, params, shape, mesh)
  single = spec["steps"] >= 1000  # DDPM's 1000 steps: one timed run, no warm-up
  repeats = 1 if single else spec["repeats"]
  calls = iter(range(1, 10**6))
  median, low, high = common.time_call(
    lambda: jax.block_until_ready(compiled(params, jax.random.key(next(calls)))),
    repeats,
    warmup=0 if single else 1,
  )
  return {
    "compile_s": compile_s,
    "seconds": [median, low, high],
    "xla_memory_mb": memory,
    "flops": forward_flops * spec["steps"],
    "devices": mesh.size,
    "params": state_param_count(train_state),
    "peak_rss_mb": common.peak_rss_mb(),
    "num_timesteps": config.diffusion.num_timesteps,
  }


def _forward_flops(eval_graphdef, params, shape, mesh) -> float:
  """FLOPs of one denoiser call on the whole batch (a scan's body is counted once, so the
  sampler's own program cannot give its total)."""
  x = jax.device_put(jnp.zeros(shape, jnp.float32), parallel.batch_sharding(mesh))
  t = jax.device_put(jnp.zeros(shape[:1], jnp.int32), parallel.batch_sharding(mesh))
  forward = jax.jit(lambda p, x, t: nnx.merge(eval_graphdef, p)(x, t))
  return compiled_costs(forward.lower(params, x, t).compile(), mesh.size)["flops"]


def measure_ceiling(spec: dict) -> dict:
  """FLOP/s of large matmuls, one [n, n] @ [n, n] per device at once: the compute roof."""
  n = spec.get("n", 2048)
  dtype = jnp.dtype(spec.get("dtype", "float32"))
  mesh = parallel.data_mesh()
  sharding = parallel.batch_sharding(mesh)
  a = jax.device_put(jax.random.normal(jax.random.key(0), (mesh.size, n, n), dtype), sharding)
  b = jax.device_put(jax.random.normal(jax.random.key(1), (mesh.size, n, n), dtype), sharding)
  matmul = jax.jit(
    lambda a, b: jnp.einsum("dij,djk->dik", a, b, preferred_element_type=jnp.float32)
  )
  median, low, high = common.time_call(
    lambda: matmul(a, b).block_until_ready(), spec["repeats"], warmup=1
  )
  return {"flops": 2.0 * n**3 * mesh.size, "seconds": [median, low, high], "devices": mesh.size}


MEASURE = {"train": measure_train, "sample": measure_sample, "ceiling": measure_ceiling}


def measure(spec: dict) -> dict:
  """The result of one measurement: spec["kind"] is train, sample or ceiling."""
  spec = {"repeats": 5, **spec}
  result = MEASURE[spec["kind"]](spec)
  result["machine"] = common.machine_description()
  return result


def main():
  print(json.dumps(measure(json.loads(sys.argv[1]))))


if __name__ == "__main__":
  main()
