"""Where the train step's time goes, per XLA operation, on this machine's CPU.

  python benchmarks/profile_step.py [--model=small] [--batch=32] [--devices=N] [--steps=10]
      [--set key=value ...] [--top=25]

Builds the train step as the training loop does (benchmarks/common.model_config, random
batches of the model's image shape), runs it warm, then records `steps` steps with JAX's
profiler while XLA's CPU backend times every HLO operation (XLA_FLAGS
--xla_cpu_enable_xprof_traceme, set here before JAX starts). Each recorded operation is
classified from the compiled HLO by its opcode, and a fusion by the heaviest operation it holds
(convolution > dot > reduce > elementwise), then printed twice: totals per kind (ms per step, the
share of the operations' time) and the `top` slowest operations. With several devices the times
of all devices' threads are summed, so the shares say where the work goes; the wall time of a
step is printed separately.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The HLO operation kinds, heaviest first: a fusion is named after the first one it contains.
KINDS = (
  "convolution",
  "dot",
  "all-reduce",
  "reduce",
  "concatenate",
  "copy",
  "transpose",
  "scatter",
  "gather",
  "dynamic-update-slice",
  "elementwise",
)
ELEMENTWISE = {
  "add",
  "multiply",
  "subtract",
  "divide",
  "exponential",
  "log",
  "logistic",
  "maximum",
  "minimum",
  "rsqrt",
  "sqrt",
  "tanh",
  "select",
  "compare",
  "convert",
  "broadcast",
  "negate",
  "power",
  "abs",
  "clamp",
  "and",
  "or",
  "constant",
  "parameter",
  "reshape",
  "bitcast",
  "slice",
  "iota",
  "pad",
  "tuple",
  "get-tuple-element",
  "exponential-minus-one",
  "log-plus-one",
}
INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*\S.*?\s([a-z][\w\-]*)\(")
COMPUTATION = re.compile(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
CALLS = re.compile(r"calls=%?([\w.\-]+)")


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", default="small", help="small | cifar10 | tiny")
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument(
    "--devices", type=int, default=None, help="XLA CPU devices (default: one per core, as main.py)"
  )
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--top", type=int, default=25)
  parser.add_argument("--set", action="append", default=[], help="key=value config overrides")
  return parser.parse_args(argv)


def start_jax(devices):
  """XLA flags for per-operation timing and the device count; then imports JAX."""
  from jax_ddpm.runtime import devices as host_devices

  flags = os.environ.get("XLA_FLAGS", "")
  if devices:
    flags += f" --xla_force_host_platform_device_count={devices}"
  else:
    flags = host_devices.with_cpu_devices(flags)
  os.environ["XLA_FLAGS"] = flags + " --xla_cpu_enable_xprof_traceme=true"
  import jax

  return jax


def hlo_kinds(hlo_text: str) -> dict[str, str]:
  """Instruction name -> kind, for every instruction of the compiled module; a fusion (or
  call) takes the heaviest kind of the computation it calls."""
  opcodes, members, calls, current = {}, collections.defaultdict(list), {}, None
  for line in hlo_text.splitlines():
    match = COMPUTATION.match(line)
    if match and "=" not in line.split("{")[0]:
      current = match.group(1)
      continue
    match = INSTRUCTION.match(line)
    if match:
      name, opcode = match.groups()
      opcodes[name] = opcode
      members[current].append(name)
      called = CALLS.search(line)
      if called:
        calls[name] = called.group(1)

  def kind_of(name, depth=0):
    opcode = opcodes.get(name, "")
    if name in calls and depth < 8:
      inner = [kind_of(member, depth + 1) for member in members.get(calls[name], [])]
      return min(
        inner, default="elementwise", key=lambda k: KINDS.index(k) if k in KINDS else len(KINDS)
      )
    if opcode.startswith("all-reduce") or opcode.startswith("reduce-scatter"):
      return "all-reduce"
    if opcode in KINDS:
      return opcode
    return "elementwise" if opcode in ELEMENTWISE or not opcode else opcode

  kinds = {name: kind_of(name) for name in opcodes}
  return {name: (kind if kind in KINDS else "other: " + kind) for name, kind in kinds.items()}


def recorded_operations(trace_dir: str) -> list[tuple[str, float]]:
  """(HLO operation name, duration ms) of every XLA-operation event in the trace."""
  from tensorflow.tsl.profiler.protobuf import xplane_pb2

  events = []
  for path in glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True):
    space = xplane_pb2.XSpace()
    with open(path, "rb") as f:
      space.ParseFromString(f.read())
    for plane in space.planes:
      names = {key: value.name for key, value in plane.event_metadata.items()}
      for line in plane.lines:
        for event in line.events:
          events.append((names.get(event.metadata_id, ""), event.duration_ps / 1e9))
  return events


def main(argv=None) -> None:
  args = parse_args(argv)
  jax = start_jax(args.devices)
  import numpy as np

  from benchmarks import common
  from benchmarks.run import parse_value
  from jax_ddpm.runtime import mesh as parallel
  from jax_ddpm.training import state
  from jax_ddpm.training import step as train

  overrides = {key: parse_value(value) for key, value in (item.split("=", 1) for item in args.set)}
  config = common.model_config(args.model, overrides or None)
  mesh = parallel.data_mesh()
  run = common.build(config)
  graphdef, _, train_state = state.create_train_state(run.unet, config.seed, mesh, run.optimizer)
  train_fn = train.make_train_fn(graphdef, run.schedule, run.optimizer, run.step_options, mesh)
  size, channels = config.data.image_size, config.data.channels
  images = np.random.default_rng(0).uniform(-1, 1, (args.batch, size, size, channels))
  batch = {"image": jax.device_put(images.astype(np.float32), parallel.batch_sharding(mesh))}
  compiled = train_fn.lower(train_state, batch).compile()
  kinds = hlo_kinds(compiled.as_text())
  for _ in range(3):  # warm
    train_state, metrics = train_fn(train_state, batch)
  jax.block_until_ready(metrics["loss"])
  trace_dir = tempfile.mkdtemp(prefix="profile_step_")
  started = time.perf_counter()
  with jax.profiler.trace(trace_dir):
    for _ in range(args.steps):
      train_state, metrics = train_fn(train_state, batch)
    jax.block_until_ready(metrics["loss"])
  wall_ms = (time.perf_counter() - started) * 1e3 / args.steps
  totals, per_operation = collections.Counter(), collections.Counter()
  for name, ms in recorded_operations(trace_dir):
    if name in kinds:
      totals[kinds[name]] += ms / args.steps
      per_operation[name] += ms / args.steps
  if not totals:
    raise SystemExit(
      "The trace holds no XLA operation events: this jaxlib's CPU backend did not "
      "honour --xla_cpu_enable_xprof_traceme."
    )
  recorded = sum(totals.values())
  print(f"{args.model}, batch {args.batch}, {mesh.size} device(s); {common.machine_description()}")
  print(f"CPU flags: {cpu_flags()}")
  print(
    f"wall time per step (traced): {wall_ms:.1f} ms; operations' time summed over devices: "
    f"{recorded:.1f} ms\n"
  )
  common.print_table(
    ["kind", "ms/step", "share"],
    [[k, f"{v:.2f}", f"{v / recorded:.1%}"] for k, v in totals.most_common()],
  )
  print()
  common.print_table(
    ["operation", "kind", "ms/step", "share"],
    [
      [n, kinds[n], f"{v:.2f}", f"{v / recorded:.1%}"]
      for n, v in per_operation.most_common(args.top)
    ],
  )


def cpu_flags() -> str:
  """The vector-instruction flags of /proc/cpuinfo that matter to XLA's CPU code."""
  from jax_ddpm.runtime import devices as host_devices

  flags = host_devices.cpu_flags()
  wanted = ("avx", "avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")
  return " ".join(flag for flag in wanted if flag in flags) or "none of " + ", ".join(wanted)


if __name__ == "__main__":
  main()
