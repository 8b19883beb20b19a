"""The benchmark entry point (benchmarks/run.py) and its measurements report sane numbers.

The measurements run in this process (run.py starts one process per row; the last test runs
one such process), which keeps the test to seconds.
"""

import json
import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("diffusers")

from benchmarks import jax_cases, run, torch_peer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def in_process(module, spec, env):
  del env
  return {"benchmarks.jax_cases": jax_cases, "benchmarks.torch_peer": torch_peer}[module].measure(
    spec
  )


def test_benchmark_prints_tables_with_peer_ratios_for_the_same_network(
  tmp_path, monkeypatch, capsys
):
  monkeypatch.setattr(run, "run_case", in_process)
  raw = tmp_path / "raw.json"
  run.main(
    [
      "--models",
      "tiny",
      "--train_batches",
      "tiny=8",
      "--sample_batches",
      "tiny=8",
      "--sample_steps",
      "2",
      "--repeats",
      "1",
      "--peer",
      "--json",
      str(raw),
    ]
  )
  out = capsys.readouterr().out
  assert "Machine: " in out and "Matmul ceiling" in out
  assert re.search(r"\| tiny \(0\.2M\) +\| 8 +\|", out)
  assert "ddim-2" in out and "ddpm-100 (derived)" in out
  results = json.loads(raw.read_text())
  train = results["train"][0]
  # The peer is built from the same config: identical parameter counts.
  assert train["jax"]["params"] == train["torch"]["params"]
  assert train["jax"]["flops"] > 0 and 0 <= train["jax"]["data_wait"] < 1
  assert train["jax"]["xla_memory_mb"] > 0 and train["jax"]["peak_rss_mb"] > 0
  for result in [train] + results["sample"]:
    for implementation in ("jax", "torch"):
      median, low, high = result[implementation]["seconds"]
      assert 0 < low <= median <= high
  ratio_cells = [
    line.rsplit("|", 2)[-2].strip() for line in out.splitlines() if line.startswith("| tiny")
  ]
  assert ratio_cells and all(float(cell) > 0 for cell in ratio_cells)


def test_a_measurement_runs_as_its_own_process_and_prints_json():
  completed = subprocess.run(
    [sys.executable, "-m", "benchmarks.jax_cases", '{"kind": "ceiling", "n": 128, "repeats": 1}'],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  assert completed.returncode == 0, completed.stderr[-3000:]
  result = json.loads(completed.stdout.strip().splitlines()[-1])
  assert result["flops"] == 2 * 128**3 * result["devices"] and result["seconds"][0] > 0


def test_unknown_model_fails_before_any_measurement():
  with pytest.raises(
    ValueError,
    match=r"Unknown model 'imagenet'; allowed values: "
    r"\['small', 'cifar10', 'tiny'\]",
  ):
    run.main(["--models", "imagenet"])


def test_misspelt_set_key_fails_before_any_measurement(monkeypatch, capsys):
  monkeypatch.setattr(run, "run_case", lambda *a: pytest.fail("a measurement started"))
  with pytest.raises(SystemExit):
    run.main(["--models", "tiny", "--set", "model.rematt=True"])
  assert 'Did you mean "remat"' in capsys.readouterr().err


@pytest.mark.parametrize(
  "flag, value",
  [("--sample_batches", "small=0"), ("--train_batches", "small=32,x"), ("--sample_steps", "10,-5")],
)
def test_a_batch_or_step_count_that_is_not_positive_fails_before_any_measurement(
  flag, value, monkeypatch, capsys
):
  monkeypatch.setattr(run, "run_case", lambda *a: pytest.fail("a measurement started"))
  with pytest.raises(SystemExit):
    run.main(["--models", "tiny", flag, value])
  assert "expected positive integers" in capsys.readouterr().err


def test_recipe_ablation_refuses_unknown_variants_and_tabulates_its_results(tmp_path, capsys):
  from benchmarks import recipe_ablation

  command = [
    sys.executable,
    os.path.join(ROOT, "benchmarks", "recipe_ablation.py"),
    f"--root={tmp_path}",
    "--variants=default,wider",
  ]
  failed = subprocess.run(command, capture_output=True, text=True, check=False)
  assert failed.returncode == 2 and "unknown variants ['wider']" in failed.stderr
  assert not os.listdir(tmp_path)  # nothing trained
  overrides = [
    "--config.training.loss_weighting=min_snr",
    "--config.sampling.eta=1.0",
    "--config.sampling.spacing=uniform",
  ]  # stored as run: the earlier recipe's keys too
  row = {
    "variant": "min_snr_eta1",
    "overrides": overrides,
    "seconds": 1000.0,
    "steps": 3000,
    "feature_distance": 50.0,
    "classifier_score": 9.0,
    "precision": 0.7,
    "recall": 0.9,
    "label_histogram": list(range(10)),
  }
  reseeded = {**row, "sample_seed": 1, "feature_distance": 60.0, "label_histogram": [2] * 10}
  with open(tmp_path / "results.jsonl", "w") as f:
    f.write(json.dumps(row) + "\n" + json.dumps(reseeded) + "\n")
  recipe_ablation.print_report(str(tmp_path))
  table = capsys.readouterr().out
  # Only what differs from the earlier recipe shows; two sampling seeds give mean +- std.
  cells = [c.strip() for c in table.splitlines()[-1].split("|")[1:-1]]
  assert cells[:6] == [
    "min_snr_eta1",
    "training.loss_weighting=min_snr sampling.eta=1.0",
    "1000",
    "3000",
    "0,1",
    "55.0 +- 7.1",
  ]
  assert "| 1 2 2 2 3 4 4 4 5 6 |" in table  # the histograms' mean, rounded half to even


def test_every_recipe_ablation_variant_is_a_valid_config():
  """A misspelt key or a refused value fails here, not 20 minutes into an ablation."""
  import jax
  import runs

  from benchmarks import common, recipe_ablation
  from jax_ddpm.io import errors
  from jax_ddpm.runtime import mesh
  from jax_ddpm.training import loop

  two_devices = mesh.data_mesh(jax.devices()[:2])
  trained = {name: recipe_ablation.config_overrides(name) for name in recipe_ablation.VARIANTS}
  sampled = {
    name: {**trained[variant], **sampling}
    for name, (variant, sampling, *_) in recipe_ablation.SAMPLED_VARIANTS.items()
  }
  for name, overrides in {**trained, **sampled}.items():
    config = common.model_config("small", overrides)  # locked: a misspelt key raises
    if name in recipe_ablation.REFUSED:  # measured before the check that refuses it
      with pytest.raises(errors.ConfigError, match=re.escape(recipe_ablation.REFUSED[name])):
        loop.check_machine(runs.build(config), two_devices)
      continue
    loop.check_machine(runs.build(config), two_devices)


def test_recipe_ablation_times_an_earlier_checkpoint_by_the_uptime_after_it(tmp_path):
  from benchmarks import recipe_ablation

  (tmp_path / "wide_train.log").write_text(
    "I1130 logging_writer.py:48] [50] uptime=20.5\n"
    "I1130 logging_writer.py:48] [100] steps_per_sec=2.5\n"
    "I1130 logging_writer.py:48] [100] uptime=40.0\n"
    "I1130 logging_writer.py:48] [150] uptime=61.5\n"
  )
  # A 100 s run whose summaries counted 21.5 s after step 100 took 78.5 s up to it.
  assert recipe_ablation.seconds_until("wide", str(tmp_path), 100, 100.0) == 78.5
  with pytest.raises(ValueError, match="no uptime at step 75"):
    recipe_ablation.seconds_until("wide", str(tmp_path), 75, 100.0)


def test_the_accelerator_check_runs_a_smaller_config_on_a_cpu_and_writes_its_table(
  tmp_path, capsys
):
  """benchmarks/accelerator.py as the GPU machine runs it, on the smoke config: every case in its
  own process, the peer's rows, the anchor row, the table and its JSON."""
  from benchmarks import accelerator

  accelerator.main(["--smoke", "--out", str(tmp_path)])
  out = capsys.readouterr().out
  print(out)
  assert "Machine: " in out and "| train step, float32" in out and "TPU v3-8" in out
  report = json.loads((tmp_path / "accelerator.json").read_text())
  results = [case["result"] for case in report["cases"]]
  assert not [r["error"] for r in results if "error" in r]
  train = [c["result"] for c in report["cases"] if c["spec"]["kind"] == "train"]
  assert len(train) == 2 and all(r["flops"] > 0 and r["seconds"][0] > 0 for r in train)
  peer = next(c["result"] for c in report["cases"] if c["spec"]["kind"] == "torch")
  assert {"train float32", "train bfloat16", "sample ddim", "sample dpmpp_2m"} <= set(peer)
  ratios = [row[-1] for row in report["table"]["rows"][:4]]
  assert all(float(ratio) > 0 for ratio in ratios), ratios


def test_the_sampler_benchmark_draws_every_sampler_within_each_budget_of_network_calls():
  import runs

  from benchmarks import sampler_quality
  from configs import mnist
  from jax_ddpm.samplers import registry

  run = runs.build(mnist.get_config())  # trained on t <= 800: no sampler may start above it
  for calls in (5, 10, 20, 50):
    chosen = sampler_quality.at_budget(calls, run)
    assert {s.name for s in chosen} == set(registry.REGISTRY) - {"ddpm"}
    for sampler in chosen:
      timesteps = sampler.timesteps(run.schedule)
      assert calls - 1 <= len(timesteps) <= calls, (sampler, len(timesteps))
      assert max(timesteps) <= 800 + 1e-9, sampler
