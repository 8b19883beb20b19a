"""The benchmark: training and sampling speed of jax_ddpm, optionally beside its PyTorch peer.

Prints Markdown tables (median of repeats with the min-max range, the machine named):
  - the matmul ceiling: FLOP/s of large float32 matmuls on all devices (and in PyTorch);
  - training: steps/s and images/s of the small (configs/mnist.py, 1.1M parameters) and the
    CIFAR-10 (configs/cifar10.py, 35.7M) U-Nets at several batch sizes, compile time, FLOP/s from
    XLA's cost analysis and its share of the ceiling, XLA's memory per device, the process's peak
    RSS, and the share of step time spent waiting on the input pipeline;
  - sampling: images/s of DDIM at several step counts and of DDPM-1000, ms per reverse step,
    compile time.
With --peer, diffusers' UNet2DModel of the same network (benchmarks/torch_peer.py) is measured
in the same run on the same threads, and each row gets the ratio ours / peer (> 1: we are faster).

Every row runs in a fresh process (benchmarks/jax_cases.py, benchmarks/torch_peer.py), so each
has its own peak RSS and compile caches. On a CPU-only host JAX gets one XLA device per core, as
main.py does (--devices overrides). Experiments: --set key=value changes the run config
(e.g. --set model.compute_dtype=bfloat16), --xla_flags adds XLA options.

  python benchmarks/run.py                      # about 10 minutes on a 2-core CPU
  python benchmarks/run.py --peer               # plus diffusers' UNet2DModel, and the ratios
  python benchmarks/run.py --models small --train_batches small=32 --sample_steps 10
"""

import argparse
import ast
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import common  # noqa: E402 (after the path is set)
from jax_ddpm.runtime import devices as host_devices  # noqa: E402


def positive_ints(text: str) -> list[int]:
  """'32,64' -> [32, 64]; a ValueError names anything that is not a positive integer."""
  values = [int(s) if s.strip().isdigit() else -1 for s in text.split(",") if s.strip()]
  if any(v < 1 for v in values):
    raise ValueError(f"{text!r}: expected positive integers separated by commas")
  return values


def parse_batches(text: str) -> dict[str, list[int]]:
  """'small=32,64;cifar10=8' -> {'small': [32, 64], 'cifar10': [8]}; 'small=' measures none."""
  batches = {}
  for part in filter(None, text.split(";")):
    name, _, sizes = part.partition("=")
    batches[name.strip()] = positive_ints(sizes)
  return batches


def parse_value(text: str):
  """'True' -> True, '8' -> 8, '(1, 2)' -> (1, 2); anything else stays a string."""
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def parse_args(argv=None):
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--models", default="small,cifar10")
  parser.add_argument(
    "--train_batches", default="small=32,64;cifar10=8,16", help="global batch sizes per model"
  )
  parser.add_argument("--sample_batches", default="small=64;cifar10=8")
  parser.add_argument(
    "--sample_steps",
    default="10,50",
    help="DDIM step counts; DDPM always runs all T steps (1000 here)",
  )
  parser.add_argument(
    "--ddpm",
    choices=("measure", "derive", "skip"),
    default="derive",
    help="DDPM-T: run it (long on a CPU), or derive its images/s from the "
    "ms per step of the longest DDIM run (the per-step program is the same "
    "network call; benchmarks/sampler_overhead.py shows the loop is < 1%%)",
  )
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument(
    "--peer",
    action="store_true",
    help="also measure diffusers' UNet2DModel (PyTorch) and print ratios",
  )
  parser.add_argument(
    "--devices", type=int, default=None, help="XLA CPU devices (default: one per core, as main.py)"
  )
  parser.add_argument(
    "--set",
    action="append",
    default=[],
    metavar="KEY=VALUE",
    help="run config override for the JAX rows, e.g. model.compute_dtype=bfloat16",
  )
  parser.add_argument("--steps_per_dispatch", type=int, default=1)
  parser.add_argument("--no_donate", action="store_true", help="do not donate the train state")
  parser.add_argument("--xla_flags", default="", help="extra XLA_FLAGS for the JAX rows")
  parser.add_argument("--json", default=None, help="also write every raw result to this file")
  args = parser.parse_args(argv)
  args.models = [m for m in args.models.split(",") if m]
  malformed = [item for item in args.set if "=" not in item]
  if malformed:
    parser.error(f"--set takes KEY=VALUE, got {malformed}")
  args.overrides = {
    key: parse_value(value) for key, value in (item.split("=", 1) for item in args.set)
  }
  for name in args.models:  # unknown models and --set keys fail here, before anything runs
    try:
      common.model_config(name, args.overrides)
    except (KeyError, TypeError) as error:
      parser.error(f"--set on model {name}: {error}")
  try:
    args.train_batches = parse_batches(args.train_batches)
    args.sample_batches = parse_batches(args.sample_batches)
    args.sample_steps = positive_ints(args.sample_steps)
  except ValueError as error:
    parser.error(f"--train_batches, --sample_batches or --sample_steps: {error}")
  return args


def run_case(module: str, spec: dict, env: dict) -> dict:
  """Runs one measurement in a fresh process; returns its JSON result."""
  completed = subprocess.run(
    [sys.executable, "-m", module, json.dumps(spec)],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    check=False,
  )
  lines = completed.stdout.strip().splitlines()
  if completed.returncode != 0 or not lines:
    raise RuntimeError(
      f"{module} {spec} failed (exit {completed.returncode}):\n{completed.stderr[-3000:]}"
    )
  return json.loads(lines[-1])


def environments(args) -> tuple[dict, dict]:
  """(env of the JAX rows, env of the PyTorch rows)."""
  jax_env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  flags = f"{os.environ.get('XLA_FLAGS', '')} {args.xla_flags}".strip()
  jax_env["XLA_FLAGS"] = host_devices.with_cpu_devices(flags, args.devices)
  torch_env = dict(os.environ)
  return jax_env, torch_env


def rate(count: float, seconds: list[float]) -> str:
  median, low, high = seconds
  return f"{count / median:.2f} ({count / high:.2f}-{count / low:.2f})"


def ratio(ours: dict | None, peer: dict | None) -> str:
  if not ours or not peer:
    return "-"
  return f"{peer['seconds'][0] / ours['seconds'][0]:.2f}"


def main(argv=None):
  args = parse_args(argv)
  jax_env, torch_env = environments(args)
  results = {"args": {k: v for k, v in vars(args).items()}}

  ceiling = run_case("benchmarks.jax_cases", {"kind": "ceiling", "repeats": args.repeats}, jax_env)
  ceiling_flops = ceiling["flops"] / ceiling["seconds"][0]
  peer_ceiling = None
  if args.peer:
    peer_ceiling = run_case(
      "benchmarks.torch_peer", {"kind": "ceiling", "repeats": args.repeats}, torch_env
    )
  results["ceiling"] = {"jax": ceiling, "torch": peer_ceiling}

  train_rows, sample_rows = [], []
  for model in args.models:
    for batch in args.train_batches.get(model, []):
      spec = {
        "kind": "train",
        "model": model,
        "batch": batch,
        "repeats": args.repeats,
        "set": args.overrides,
        "steps_per_dispatch": args.steps_per_dispatch,
        "donate": not args.no_donate,
      }
      ours = run_case("benchmarks.jax_cases", spec, jax_env)
      peer = run_case("benchmarks.torch_peer", spec, torch_env) if args.peer else None
      results.setdefault("train", []).append({"spec": spec, "jax": ours, "torch": peer})
      train_rows.append(train_row(model, batch, ours, peer, ceiling_flops, args.peer))
      print(f"  train {model} batch {batch}: done", file=sys.stderr, flush=True)
    for batch in args.sample_batches.get(model, []):
      runs = [("ddim", s) for s in args.sample_steps]
      if args.ddpm == "measure":
        runs.append(("ddpm", common.model_config(model, args.overrides).diffusion.num_timesteps))
      longest = {}
      for sampler, steps in runs:
        spec = {
          "kind": "sample",
          "model": model,
          "batch": batch,
          "sampler": sampler,
          "steps": steps,
          "repeats": args.repeats,
          "set": args.overrides,
        }
        ours = run_case("benchmarks.jax_cases", spec, jax_env)
        peer = run_case("benchmarks.torch_peer", spec, torch_env) if args.peer else None
        results.setdefault("sample", []).append({"spec": spec, "jax": ours, "torch": peer})
        sample_rows.append(
          sample_row(
            model, batch, f"{sampler}-{steps}", steps, ours, peer, ceiling_flops, args.peer
          )
        )
        if sampler == "ddim" and steps >= longest.get("steps", 0):
          longest = {"steps": steps, "jax": ours, "torch": peer}
        print(f"  sample {model} {sampler}-{steps}: done", file=sys.stderr, flush=True)
      if args.ddpm == "derive" and longest:
        sample_rows.append(derived_ddpm_row(model, batch, longest, args.peer))

  print(f"Machine: {ceiling['machine']}")
  print(f"Command: python benchmarks/run.py {' '.join(sys.argv[1:] if argv is None else argv)}")
  print(
    f"Median of {args.repeats} (min-max); DDPM once. JAX rows: {ceiling['devices']} XLA "
    f"device(s), XLA_FLAGS='{jax_env['XLA_FLAGS']}'"
    + (f", overrides {args.overrides}" if args.overrides else "")
  )
  line = f"\nMatmul ceiling (2048^3 float32): JAX {ceiling_flops / 1e9:.0f} GFLOP/s"
  if peer_ceiling:
    line += (
      f", PyTorch {peer_ceiling['flops'] / peer_ceiling['seconds'][0] / 1e9:.0f} GFLOP/s "
      f"({peer_ceiling['threads']} threads, torch {peer_ceiling['torch']})"
    )
  print(line + "\n")
  header = [
    "model",
    "batch",
    "steps/s",
    "images/s",
    "compile s",
    "GFLOP/s (% ceiling)",
    "XLA MiB/device",
    "peak RSS MiB",
    "data wait",
  ]
  if args.peer:
    header += ["peer steps/s", "peer RSS MiB", "ratio"]
  print("Training (one step: forward, backward, Adam, EMA)")
  common.print_table(header, train_rows)
  header = [
    "model",
    "batch",
    "sampler",
    "images/s",
    "ms/step",
    "compile s",
    "GFLOP/s (% ceiling)",
    "peak RSS MiB",
  ]
  if args.peer:
    header += ["peer images/s", "ratio"]
  print("\nSampling (EMA weights, eta 0 for DDIM)")
  common.print_table(header, sample_rows)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=1)


def model_cell(model: str, result: dict) -> str:
  return f"{model} ({result['params'] / 1e6:.1f}M)"


def flops_cell(flops: float | None, seconds: float, ceiling_flops: float) -> str:
  if flops is None:
    return "-"
  achieved = flops / seconds
  return f"{achieved / 1e9:.0f} ({100 * achieved / ceiling_flops:.0f}%)"


def train_row(model, batch, ours, peer, ceiling_flops, with_peer) -> list:
  median = ours["seconds"][0]
  row = [
    model_cell(model, ours),
    batch,
    rate(1, ours["seconds"]),
    f"{batch / median:.1f}",
    f"{ours['compile_s']:.1f}",
    flops_cell(ours["flops"], median, ceiling_flops),
    f"{ours['xla_memory_mb']:.0f}",
    f"{ours['peak_rss_mb']:.0f}",
    f"{100 * ours['data_wait']:.1f}%",
  ]
  if with_peer:
    row += [rate(1, peer["seconds"]), f"{peer['peak_rss_mb']:.0f}", ratio(ours, peer)]
  return row


def sample_row(model, batch, name, steps, ours, peer, ceiling_flops, with_peer) -> list:
  median = ours["seconds"][0]
  row = [
    model_cell(model, ours),
    batch,
    name,
    rate(batch, ours["seconds"]),
    f"{1e3 * median / steps:.1f}",
    f"{ours['compile_s']:.1f}",
    flops_cell(ours["flops"], median, ceiling_flops),
    f"{ours['peak_rss_mb']:.0f}",
  ]
  if with_peer:
    row += [rate(batch, peer["seconds"]), ratio(ours, peer)]
  return row


def derived_ddpm_row(model, batch, longest, with_peer) -> list:
  """DDPM-T images/s from the ms per step of the longest DDIM run (marked 'derived')."""

  def derived(result):
    return batch / (result["seconds"][0] / longest["steps"] * longest["jax"]["num_timesteps"])

  num_timesteps = longest["jax"]["num_timesteps"]
  row = [
    model_cell(model, longest["jax"]),
    batch,
    f"ddpm-{num_timesteps} (derived)",
    f"{derived(longest['jax']):.3f}",
    f"{1e3 * longest['jax']['seconds'][0] / longest['steps']:.1f}",
    "-",
    "-",
    "-",
  ]
  if with_peer:
    row += [f"{derived(longest['torch']):.3f}", ratio(longest["jax"], longest["torch"])]
  return row


if __name__ == "__main__":
  main()
