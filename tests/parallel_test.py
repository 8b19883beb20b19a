"""Mesh programs on the device count users have: a host far ahead of 2 CPU devices must not hang."""

import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# 3000 launches of a data-parallel gradient step (one all-reduce each) with no result read in
# between. Without parallel.DispatchLimit, XLA's CPU client on 2 devices aborts here: after
# about 50 launches queued ahead, a pool thread waits for an in-flight slot while the
# all-reduce needs both threads (rendezvous timeout, exit 134).
PROGRAM = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from jax_ddpm.runtime import mesh as parallel
    mesh = parallel.data_mesh()
    assert mesh.size == 2, mesh

    @jax.jit
    def step(w, x):
      return w - 0.01 * jax.grad(lambda w: jnp.mean(jnp.tanh(x @ w) ** 2))(w)

    w = jax.device_put(np.eye(512, dtype=np.float32), parallel.replicated(mesh))
    x = np.random.default_rng(0).normal(size=(64, 512)).astype(np.float32)
    in_flight = parallel.DispatchLimit()
    for _ in range(3000):
      w = step(w, jax.device_put(x, parallel.batch_sharding(mesh)))
      in_flight.add(w)
    print("finished", float(w.sum()))
""")


def test_a_loop_that_reads_no_result_runs_to_the_end_on_two_cpu_devices():
  environment = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
  result = subprocess.run(
    [sys.executable, "-c", PROGRAM],
    cwd=ROOT,
    env=environment,
    capture_output=True,
    text=True,
    timeout=240,
  )
  assert result.returncode == 0 and "finished" in result.stdout, result.stderr[-3000:]


def test_dispatch_limit_waits_for_the_oldest_result_beyond_the_limit():
  import jax.numpy as jnp

  from jax_ddpm.runtime import mesh as parallel

  class Watched:
    """A result whose readiness the limit asks for; records the order of the waits."""

    waited = []

    def __init__(self, name):
      self.name, self.value = name, jnp.zeros(())

    def block_until_ready(self):
      Watched.waited.append(self.name)
      return self

  limit = parallel.DispatchLimit(limit=2)
  for name in "abcde":
    limit.add(Watched(name))
  assert Watched.waited == ["a", "b", "c"]
