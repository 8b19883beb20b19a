"""The accelerator check: the DDPM CIFAR-10 network's train step and samplers on one accelerator,
beside diffusers' PyTorch UNet2DModel of the same configuration on the same chip.

  bash benchmarks/accelerator.sh --out=DIR              # on the GPU machine, wheels installed
  python benchmarks/accelerator.py --out=DIR --smoke    # a smaller config on a CPU, a minute

Rows: the train step (forward, backward, Adam, EMA) at global batch 128 in float32 and bfloat16
compute (`model.compute_dtype`): steps/s, images/s, peak device memory, compile time and model
FLOPs utilisation (XLA's FLOP count of the step against the chip's dense bfloat16 peak);
sampling images/s of DDIM-50 and DPM-Solver++(2M)-20 at batch 500; the same for the PyTorch peer
(float32 and bfloat16 autocast, and torch.compile where time is left), with ours / theirs per row;
and the DDPM paper's anchor, 21 steps/s at batch 128 on a TPU v3-8. Every measurement runs in its
own process (its own peak memory and compile caches); the table is printed and written with every
number to DIR/accelerator.json. Nothing here imports TensorFlow.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

# The smoke test's network: configs/tiny.py made smaller still, so that it compiles in seconds.
SMOKE = {"data.image_size": 8, "model.ch": 8, "model.num_groups": 4, "model.attn_resolutions": (4,)}
# Dense bfloat16 peak of a chip, FLOP/s, by jax's device_kind (NVIDIA's data sheets).
PEAK_BFLOAT16 = {
  "NVIDIA H200": 989.4e12,
  "NVIDIA H100 80GB HBM3": 989.4e12,
  "NVIDIA A100-SXM4-80GB": 312e12,
  "NVIDIA A100-SXM4-40GB": 312e12,
}
ANCHOR = {
  "what": "DDPM paper, CIFAR-10 train step, batch 128, TPU v3-8 (Ho et al. 2020, App. B)",
  "steps_per_s": 21.0,
}


def cases(smoke: bool) -> list[dict]:
  """Every measurement, in the order it runs."""
  model, train_batch, sample_batch = ("tiny", 8, 8) if smoke else ("cifar10", 128, 500)
  steps = {"ddim": 4, "dpmpp_2m": 4} if smoke else {"ddim": 50, "dpmpp_2m": 20}
  repeats = 2 if smoke else 20
  jax_train = [
    dict(
      kind="train", framework="jax", model=model, batch=train_batch, dtype=dtype, repeats=repeats
    )
    for dtype in ("float32", "bfloat16")
  ]
  jax_sample = [
    dict(
      kind="sample",
      framework="jax",
      model=model,
      batch=sample_batch,
      sampler=name,
      steps=n,
      dtype="float32",
      repeats=max(2, repeats // 5),
    )
    for name, n in steps.items()
  ]
  torch_cases = [
    dict(
      kind="torch",
      model=model,
      train_batch=train_batch,
      sample_batch=sample_batch,
      steps=steps,
      repeats=repeats,
      compile=not smoke,
    )
  ]
  return jax_train + jax_sample + torch_cases


def jax_run(spec: dict):
  """The built Run of a benchmarked model with the case's compute dtype."""
  from benchmarks import common

  config = common.model_config(
    spec["model"], {**overrides(spec), "model.compute_dtype": spec["dtype"]}
  )
  with config.unlocked():
    config.training.batch_size = spec["batch"]
    if spec["kind"] == "sample":
      config.sampling.sampler, config.sampling.num_steps = spec["sampler"], spec["steps"]
      config.sampling.spacing = "logsnr" if spec["sampler"] == "dpmpp_2m" else "uniform"
      config.sampling.batch_size = spec["batch"]
  return common.build(config)


def overrides(spec: dict) -> dict:
  return SMOKE if spec["model"] == "tiny" else {}


def peak_device_bytes() -> float | None:
  import jax

  stats = jax.local_devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


def measure_jax_train(spec: dict) -> dict:
  import jax
  import numpy as np

  from benchmarks import common, jax_cases
  from jax_ddpm.runtime import mesh as mesh_lib
  from jax_ddpm.training import state, step

  run = jax_run(spec)
  mesh = mesh_lib.data_mesh()
  graphdef, _, train_state = state.create_train_state(run.unet, 0, mesh, run.optimizer)
  train_fn = step.make_train_fn(graphdef, run.schedule, run.optimizer, run.step_options, mesh)
  images = np.random.default_rng(0).uniform(-1, 1, (spec["batch"], *run.image_shape))
  batch = {"image": mesh_lib.shard_batch(images.astype(np.float32), mesh)}
  started = time.perf_counter()
  compiled = train_fn.lower(train_state, batch).compile()
  compile_s = time.perf_counter() - started
  flops = jax_cases.compiled_costs(compiled, mesh.size)["flops"]
  holder = {"state": train_state}

  def one_step():
    holder["state"], metrics = compiled(holder["state"], batch)
    jax.block_until_ready(metrics["loss"])

  median, low, high = common.time_call(one_step, spec["repeats"], warmup=3)
  return {
    "seconds": [median, low, high],
    "compile_s": compile_s,
    "flops": flops,
    "peak_bytes": peak_device_bytes(),
    "params": jax_cases.state_param_count(train_state),
  }


def measure_jax_sample(spec: dict) -> dict:
  import jax

  from benchmarks import common
  from jax_ddpm.runtime import mesh as mesh_lib
  from jax_ddpm.samplers import program
  from jax_ddpm.training import state

  run = jax_run(spec)
  mesh = mesh_lib.data_mesh()
  _, eval_graphdef, train_state = state.create_train_state(run.unet, 0, mesh, run.optimizer)
  sample_fn = program.make_sample_fn(
    eval_graphdef,
    run.schedule,
    (spec["batch"], *run.image_shape),
    mesh,
    run.sampler,
    run.sampling_options,
  )
  started = time.perf_counter()
  compiled = sample_fn.lower(train_state.ema_params, jax.random.key(0)).compile()
  compile_s = time.perf_counter() - started
  keys = iter(range(1, 10**6))
  median, low, high = common.time_call(
    lambda: jax.block_until_ready(compiled(train_state.ema_params, jax.random.key(next(keys)))),
    spec["repeats"],
    warmup=1,
  )
  return {"seconds": [median, low, high], "compile_s": compile_s, "peak_bytes": peak_device_bytes()}


def measure_torch(spec: dict) -> dict:
  """The peer's rows: train float32, bfloat16 autocast and compiled; sampling DDIM and
  DPM-Solver++(2M) with diffusers' own schedulers."""
  import torch

  results = {"torch": torch.__version__}
  device = "cuda" if torch.cuda.is_available() else "cpu"
  for name, autocast, compiled in (
    ("float32", False, False),
    ("bfloat16", True, False),
    ("bfloat16 compiled", True, True),
  ):
    if compiled and not spec["compile"]:
      continue
    results[f"train {name}"] = torch_train(spec, device, autocast, compiled)
  for sampler, steps in spec["steps"].items():
    results[f"sample {sampler}"] = torch_sample(spec, device, sampler, steps)
  return results


def torch_peer(spec: dict, device: str):
  import diffusers
  import torch

  from benchmarks import common
  from jax_ddpm.models import diffusers_weights

  run = common.build(common.model_config(spec["model"], overrides(spec)))
  torch.manual_seed(0)
  model = diffusers.UNet2DModel(**diffusers_weights.diffusers_config_from_unet(run.unet))
  return run, model.to(device)


def torch_train(spec: dict, device: str, autocast: bool, compiled: bool) -> dict:
  import torch

  from benchmarks import common

  run, model = torch_peer(spec, device)
  optim = run.config.optim
  params = list(model.parameters())
  adam = torch.optim.Adam(
    params, lr=optim.learning_rate, betas=(optim.adam_b1, optim.adam_b2), eps=optim.adam_eps
  )
  ema = [p.detach().clone() for p in params]
  forward = torch.compile(model) if compiled else model
  abar = torch.tensor(run.schedule.alphas_cumprod.tolist(), device=device)
  x0 = (
    torch.rand(spec["train_batch"], run.unet.in_channels, *run.image_shape[:2], device=device) * 2
    - 1
  )

  def step():
    t = torch.randint(0, len(abar), (len(x0),), device=device)
    eps = torch.randn_like(x0)
    a = abar[t].view(-1, 1, 1, 1)
    with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
      loss = torch.nn.functional.mse_loss(
        forward(a.sqrt() * x0 + (1 - a).sqrt() * eps, t).sample.float(), eps
      )
    adam.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, optim.grad_clip_norm)
    adam.step()
    with torch.no_grad():
      torch._foreach_lerp_(ema, params, 1.0 - optim.ema_decay)
    sync(device)

  if device == "cuda":
    torch.cuda.reset_peak_memory_stats()
  started = time.perf_counter()
  step()
  first_s = time.perf_counter() - started
  median, low, high = common.time_call(step, spec["repeats"], warmup=2)
  peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
  return {"seconds": [median, low, high], "first_call_s": first_s, "peak_bytes": peak}


def torch_sample(spec: dict, device: str, sampler: str, steps: int) -> dict:
  import diffusers
  import torch

  from benchmarks import common

  run, model = torch_peer(spec, device)
  model.eval()
  d = run.config.diffusion
  schedule = dict(
    num_train_timesteps=d.num_timesteps,
    beta_start=d.beta_start,
    beta_end=d.beta_end,
    beta_schedule=d.schedule,
  )
  scheduler = (
    diffusers.DDIMScheduler(**schedule, clip_sample=True)
    if sampler == "ddim"
    else diffusers.DPMSolverMultistepScheduler(
      **schedule, algorithm_type="dpmsolver++", solver_order=2
    )
  )
  shape = (spec["sample_batch"], run.unet.in_channels, *run.image_shape[:2])

  @torch.inference_mode()
  def sample():
    scheduler.set_timesteps(steps)  # also restarts the multistep solver's history
    x = torch.randn(shape, device=device)
    for t in scheduler.timesteps:
      x = scheduler.step(model(x, t).sample, t, x).prev_sample
    sync(device)

  if device == "cuda":
    torch.cuda.reset_peak_memory_stats()
  median, low, high = common.time_call(sample, max(2, spec["repeats"] // 5), warmup=1)
  peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
  return {"seconds": [median, low, high], "peak_bytes": peak}


def sync(device: str) -> None:
  if device == "cuda":
    import torch

    torch.cuda.synchronize()


MEASURE = {("train", "jax"): measure_jax_train, ("sample", "jax"): measure_jax_sample}


def measure(spec: dict) -> dict:
  """One case's numbers, with the machine's description."""
  from benchmarks import common

  if spec["kind"] == "torch":
    result = measure_torch(spec)
  else:
    result = MEASURE[(spec["kind"], spec["framework"])](spec)
    import jax

    result["device_kind"] = jax.devices()[0].device_kind
    result["jax"] = jax.__version__
  result["machine"] = common.machine_description()
  return result


def run_case(spec: dict, timeout: float) -> dict:
  """`measure(spec)` in a fresh process; {"error": ...} if it fails or runs out of time."""
  command = [sys.executable, "-m", "benchmarks.accelerator", "--case", json.dumps(spec)]
  try:
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
  except subprocess.TimeoutExpired:
    return {"error": f"over its {timeout:.0f} s"}
  if done.returncode:
    return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"}
  return json.loads(done.stdout.strip().splitlines()[-1])


def rows(results: list[tuple[dict, dict]], smoke: bool) -> list[list]:
  """The table: one row per measurement, ours beside the peer's."""
  peer = next((r for s, r in results if s["kind"] == "torch"), {})
  jax_rows = [(s, r) for s, r in results if s["kind"] != "torch"]
  kind = next((r.get("device_kind") for _, r in jax_rows if "device_kind" in r), "")
  peak = PEAK_BFLOAT16.get(kind)
  table = []
  for spec, result in jax_rows:
    if "error" in result:
      table.append([f"{spec['kind']} {spec.get('dtype', '')}", result["error"]] + [""] * 7)
      continue
    seconds = result["seconds"][0]
    if spec["kind"] == "train":
      name, count = f"train step, {spec['dtype']}", spec["batch"]
      theirs = peer.get(f"train {spec['dtype']}", {})
      mfu = f"{100 * result['flops'] / seconds / peak:.1f}%" if peak else "-"
      rate, unit = 1 / seconds, "steps/s"
    else:
      name, count = f"{spec['sampler']}-{spec['steps']}", spec["batch"]
      theirs = peer.get(f"sample {spec['sampler']}", {})
      mfu, rate, unit = "-", count / seconds, "images/s"
    peer_rate = (
      (1 if spec["kind"] == "train" else count) / theirs["seconds"][0]
      if (theirs and "seconds" in theirs)
      else None
    )
    table.append(
      [
        name,
        count,
        f"{rate:.3g} {unit}",
        f"{count / seconds:.4g}",
        _mib(result.get("peak_bytes")),
        f"{result['compile_s']:.1f}",
        mfu,
        f"{peer_rate:.3g}" if peer_rate else "-",
        f"{rate / peer_rate:.2f}" if peer_rate else "-",
      ]
    )
  compiled = peer.get("train bfloat16 compiled")
  if compiled and "seconds" in compiled:
    table.append(
      [
        "peer: train step, bf16, torch.compile",
        128 if not smoke else 8,
        "-",
        "-",
        _mib(compiled.get("peak_bytes")),
        f"{compiled['first_call_s']:.1f}",
        "-",
        f"{1 / compiled['seconds'][0]:.3g}",
        "-",
      ]
    )
  table.append(
    [
      ANCHOR["what"],
      128,
      f"{ANCHOR['steps_per_s']} steps/s",
      f"{128 * ANCHOR['steps_per_s']:.4g}",
      "-",
      "-",
      "-",
      "-",
      "-",
    ]
  )
  return table


def _mib(value) -> str:
  return "-" if value is None else f"{value / 2**20:.0f}"


HEADER = [
  "measurement",
  "batch",
  "ours",
  "images/s",
  "peak device MiB",
  "compile s",
  "MFU",
  "PyTorch (same unit)",
  "ours / PyTorch",
]


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", help="directory for accelerator.json")
  parser.add_argument("--smoke", action="store_true", help="the tiny config, for a CPU test")
  parser.add_argument(
    "--budget_s",
    type=float,
    default=450.0,
    help="wall time for all cases; a case that would start past it is skipped",
  )
  parser.add_argument("--case", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.case:
    print(json.dumps(measure(json.loads(args.case))))
    return {}
  started, results = time.perf_counter(), []
  for spec in cases(args.smoke):
    left = args.budget_s - (time.perf_counter() - started)
    if left < (10 if args.smoke else 40):
      results.append((spec, {"error": "skipped: the time budget was spent"}))
      continue
    results.append((spec, run_case(spec, timeout=left)))
    print(
      f"  {spec['kind']} {spec.get('dtype', spec.get('sampler', ''))}: "
      f"{json.dumps(results[-1][1])[:300]}",
      file=sys.stderr,
      flush=True,
    )
  from benchmarks import common

  machine = next((r["machine"] for _, r in results if "machine" in r), "unknown")
  print(f"Machine: {machine}")
  print(f"Command: python benchmarks/accelerator.py {' '.join(argv or sys.argv[1:])}")
  print(
    f"Wall time: {time.perf_counter() - started:.0f} s; medians of repeats; MFU: XLA's FLOP "
    "count of the step over its time, against the chip's dense bfloat16 peak"
  )
  table = rows(results, args.smoke)
  common.print_table(HEADER, table)
  report = {
    "machine": machine,
    "cases": [{"spec": s, "result": r} for s, r in results],
    "table": {"header": HEADER, "rows": table},
  }
  if args.out:
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "accelerator.json"), "w") as f:
      json.dump(report, f, indent=1)
  return report


if __name__ == "__main__":
  main()
