"""The Cloud TPU pod path rehearsed on this machine: a gs:// workdir, TFDS data in the bucket.

A real GCS API server runs on loopback (tests/gcs_emulator.py). Two processes x 4 CPU devices
train through --distributed with --workdir=gs://bucket/run, reading the shipped digits as a
TFDS TFRecord dataset from the bucket, the way pod workers that share no disk run. The run
is preempted (SIGTERM to both workers), killed (SIGKILL), resumed from the bucket, and must
end with the parameters of an uninterrupted one-process run on local disk. Evaluation then
writes its samples, JSON and summaries to the bucket, and nothing lands in the directory the
commands run in.
"""

import os
import re
import signal
import sys
import time

import fault_injection
import gcs_emulator
import jax
import numpy as np
import pytest
import runs
import tensorboard_server
import tfds_data
from etils import epath
from flax import nnx

from configs import tiny
from jax_ddpm.data import sources as data_sources
from jax_ddpm.evaluation import classifier as feature_classifier
from jax_ddpm.training import checkpointing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = f"gs://{gcs_emulator.BUCKET}"
STEPS = 8
# configs/tiny.py on the TFDS digits (28 x 28 x 1; attention at 14 x 14), checkpointing every 2
# steps; eval scores 136 samples (more than the 128 feature dimensions) with an untrained digit
# classifier.
OVERRIDES = {
  "data.source": "tfds",
  "data.tfds_name": tfds_data.NAME,
  "data.split": "train",
  "data.image_size": 28,
  "model.attn_resolutions": (14,),
  "training.num_train_steps": STEPS,
  "training.log_every_steps": 1,
  "training.checkpoint_every_steps": 2,
  "training.sample_every_steps": STEPS,
  "eval.feature_net": "classifier",
  "eval.num_samples": 136,
  "eval.batch_size": 8,
  "sampling.batch_size": 136,
  "eval.classifier": f"{BUCKET}/classifier.npz",
}
RESUMED = re.compile(r"Resumed from the checkpoint of step (\d+)")


def upload(local: epath.Path, remote: epath.Path) -> None:
  for folder, _, names in local.walk():
    for name in names:
      target = remote / (folder / name).relative_to(local)
      target.parent.mkdir(parents=True, exist_ok=True)
      target.write_bytes((folder / name).read_bytes())


def listing(root: epath.Path, prefix: str = "") -> list[str]:
  """Every file under `root`, as paths relative to it (GCS paths refuse a recursive glob)."""
  files = []
  for path in root.iterdir():
    name = prefix + path.name
    files += listing(path, name + "/") if path.is_dir() else [name]
  return sorted(files)


@pytest.fixture(scope="module")
def bucket(tmp_path_factory):
  """The emulator with the digits in the bucket, as TFRecord and ArrayRecord datasets."""
  logs = tmp_path_factory.mktemp("emulator")
  with gcs_emulator.running(str(logs / "server.log")) as url:
    previous = gcs_emulator.set_environment(url)
    try:
      local = epath.Path(tmp_path_factory.mktemp("tfds"))
      for file_format in ("tfrecord", "array_record"):
        tfds_data.build(str(local / file_format), file_format)
        upload(local / file_format, epath.Path(f"{BUCKET}/tfds/{file_format}"))
      classifier = feature_classifier.Classifier(
        feature_classifier.ClassifierConfig(28, 1, 10), rngs=nnx.Rngs(0)
      )
      feature_classifier.save(classifier, OVERRIDES["eval.classifier"])
      yield url, local
    finally:
      for key, value in previous.items():
        if value is None:
          os.environ.pop(key, None)
        else:
          os.environ[key] = value


def test_tfds_data_in_the_bucket_reads_like_the_local_copy(bucket):
  _, local = bucket
  expected = data_sources.TfdsSource(tfds_data.NAME, "train", str(local / "array_record"))
  for file_format in ("tfrecord", "array_record"):
    remote = data_sources.TfdsSource(tfds_data.NAME, "train", f"{BUCKET}/tfds/{file_format}")
    assert np.array_equal(remote.read(np.arange(256)), expected.read(np.arange(256)))


def condensed(files: list[str]) -> list[str]:
  """`files` with each folder of content-addressed data files (OCDBT's d/) as one line."""
  counts = {}
  for name in files:
    folder, separator, _ = name.rpartition("/d/")
    key = folder + "/d/" if separator else name
    counts[key] = counts.get(key, 0) + 1
  return [f"{key} ({n} data files)" if key.endswith("/d/") else key for key, n in counts.items()]


class Pod:
  """Two main.py workers (4 CPU devices each, as a v4 TPU host has) of one --distributed run."""

  def __init__(self, url: str, cwd: str, args: list[str]):
    env = dict(
      os.environ,
      XLA_FLAGS="--xla_force_host_platform_device_count=4",
      **gcs_emulator.environment(url),
    )
    port = fault_injection.free_port()
    self.workers = [
      fault_injection.Run(
        [
          sys.executable,
          os.path.join(ROOT, "main.py"),
          *args,
          "--distributed",
          f"--coordinator_address=127.0.0.1:{port}",
          "--num_processes=2",
          f"--process_id={i}",
        ],
        cwd=cwd,
        env=env,
      )
      for i in range(2)
    ]

  def log(self, worker: int = 0) -> str:
    return "".join(self.workers[worker].log)

  def report(self) -> str:
    return "\n".join(
      f"worker {i} (exit {w.process.poll()}):\n{self.log(i)[-2000:]}"
      for i, w in enumerate(self.workers)
    )

  def send_when(self, sig: int, ready, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not ready():
      if any(w.process.poll() is not None for w in self.workers) or time.time() > deadline:
        raise AssertionError(f"The pod ended or stalled before {sig!r}:\n{self.report()}")
      time.sleep(0.2)
    for worker in self.workers:
      worker.process.send_signal(sig)

  def wait(self, timeout: float = 400) -> list[int]:
    return [worker.wait(timeout) for worker in self.workers]


def checkpoint_steps() -> list[int]:
  directory = epath.Path(f"{BUCKET}/run/checkpoints")
  return (
    sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())
    if (directory.exists())
    else []
  )


def test_two_workers_on_a_bucket_survive_preemption_and_match_a_local_run(bucket, tmp_path):
  url, local = bucket
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  overrides = [f"--config.{k}={v}" for k, v in OVERRIDES.items()]
  run = [
    "--config=" + os.path.join(ROOT, "configs", "tiny.py"),
    f"--workdir={BUCKET}/run",
    f"--config.data.data_dir={BUCKET}/tfds/tfrecord",
    *overrides,
  ]
  rows, started = [], time.time()
  preempted = Pod(url, str(cwd), run)  # SIGTERM, as a preemption notice: checkpoint and exit
  preempted.send_when(signal.SIGTERM, lambda: checkpoint_steps() != [])
  rows.append(("SIGTERM", preempted.wait(), checkpoint_steps(), time.time() - started))
  killed = Pod(url, str(cwd), run)  # SIGKILL once it has resumed and written another checkpoint
  first = rows[-1][2][-1]
  killed.send_when(
    signal.SIGKILL, lambda: RESUMED.search(killed.log()) and (checkpoint_steps()[-1] > first)
  )
  rows.append(("SIGKILL", killed.wait(), checkpoint_steps(), time.time() - started))
  finished = Pod(url, str(cwd), run)
  rows.append(("none", finished.wait(), checkpoint_steps(), time.time() - started))
  resumed_at = [int(RESUMED.search(pod.log()).group(1)) for pod in (killed, finished)]
  print(
    "\n".join(
      f"signal {sig}: exit codes {codes}, checkpoints {steps} ({seconds:.0f} s)"
      for sig, codes, steps, seconds in rows
    ),
    f"\nresumed at steps {resumed_at}",
  )
  assert rows[0][1] == [0, 0] and rows[1][1] == [-9, -9] and rows[2][1] == [0, 0], rows
  assert checkpoint_steps()[-1] == STEPS

  config = tiny.get_config()
  config.update_from_flattened_dict(
    dict(
      OVERRIDES,
      **{"data.data_dir": str(local / "array_record"), "training.checkpoint_every_steps": STEPS},
    )
  )
  reference = str(tmp_path / "local")
  runs.train(config, reference)  # one process, 8 devices, local disk, no resume
  pod_state = fault_injection.final_state(f"{BUCKET}/run", STEPS)
  local_state = fault_injection.final_state(reference, STEPS)
  difference = max(
    float(np.abs(a - b).max())
    for a, b in zip(jax.tree.leaves(pod_state), jax.tree.leaves(local_state))
  )
  print(f"max |pod - local| over the final state: {difference:.2e} ({time.time() - started:.0f} s)")
  assert difference <= 1e-5

  evaluation = Pod(url, str(cwd), ["--mode=eval", *run])
  assert evaluation.wait() == [0, 0], evaluation.report()
  print(f"eval done ({time.time() - started:.0f} s)")
  files = listing(epath.Path(f"{BUCKET}/run"))
  print(f"{BUCKET}/run:\n  " + "\n  ".join(condensed(files)))
  assert f"checkpoints/{STEPS}/commit_success.txt" in files
  assert f"checkpoints/{STEPS}/state/manifest.ocdbt" in files
  assert f"samples/train_step_{STEPS:08d}.png" in files
  assert f"eval/{STEPS}_ddim_4_classifier_136.json" in files
  # Process 0 alone writes summaries: at most one event file per launch (4), here in the bucket.
  assert 2 <= sum(name.startswith("events.out.tfevents.") for name in files) <= 4
  # TensorBoard's default loader reads gs:// through its own client of storage.googleapis.com
  # (no emulator setting), so the bucket's event files are served from a local copy here.
  served = tmp_path / "events_from_bucket"
  served.mkdir()
  for name in files:
    if name.startswith("events.out.tfevents."):
      (served / name).write_bytes(epath.Path(f"{BUCKET}/run/{name}").read_bytes())
  with tensorboard_server.running(str(served), str(tmp_path / "tensorboard.log")) as server:
    tags = server.wait_for(
      "plugin/scalars/tags", lambda tags: "eval/feature_distance" in tags.get(".", {})
    )
    assert {"loss", "eval/feature_distance"} <= set(tags.get(".", {})), server.log()
    assert STEPS in {
      step for _, step, _ in server.get("plugin/scalars/scalars", run=".", tag="loss")
    }
    assert "samples" in server.get("plugin/images/tags")["."]
  # The checkpoint the pod wrote loads in one process, through the restore sampling uses.
  _, restored, step = checkpointing.load_checkpoint(runs.build(config), f"{BUCKET}/run")
  assert step == STEPS == int(restored.step)
  assert os.listdir(cwd) == [], os.listdir(cwd)
