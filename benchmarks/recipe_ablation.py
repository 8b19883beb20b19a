"""Which training recipe draws the best digits in the default run's budget: an ablation table.

  python benchmarks/recipe_ablation.py --root=/tmp/ablation --classifier=CLASSIFIER.npz \
      --variants=earlier_default,min_snr,learned_sigma,min_snr_eta1

Each variant is configs/mnist.py with a few keys changed (VARIANTS). For each, the script runs the
README's training command into ROOT/<variant> (timed; training.eval_every_steps = 0 so that every
row pays for training only), then `--mode=eval` with the one classifier file given, so that every
row is scored in the same features: the feature distance to the 5000 training digits, the
classifier's score (its Inception-Score analogue, at most 10) and the histogram of predicted
digits, for eval.num_samples images drawn by the config's own sampler (DDIM-50 by default; the
SAMPLED_VARIANTS draw from a trained variant with other sampler settings, the same 50 calls).

A variant whose checkpoint already exists is not trained again (its recorded time is reused), so an
interrupted ablation resumes. ROOT/results.jsonl keeps one line per scored variant; --report prints
the table from it without running anything.
"""

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # pylint: disable=g-import-not-at-top

# configs/mnist.py before this ablation chose its recipe: the DDPM paper's uniform weighting and
# deterministic DDIM-50 on uniform spacing. Every variant is stated as overrides of the current
# file, so each row can be run again as it was; "default" is the file as it is.
EARLIER = {"training.loss_weighting": "uniform", "sampling.eta": 0.0,
           "sampling.spacing": "uniform"}
VARIANTS = {
    "default": {},
    "earlier_default": EARLIER,
    "min_snr": {**EARLIER, "training.loss_weighting": "min_snr"},
    "p2": {**EARLIER, "training.loss_weighting": "p2"},
    "learned_sigma": {**EARLIER, "model.learn_sigma": True},
    "v_min_snr": {**EARLIER, "diffusion.prediction": "v", "training.loss_weighting": "min_snr"},
    "cosine": {**EARLIER, "diffusion.schedule": "cosine"},
    "lr_2e-3": {**EARLIER, "optim.learning_rate": 2e-3},
    "ema_0.995": {**EARLIER, "optim.ema_decay": 0.995},
    "batch_64": {**EARLIER, "training.batch_size": 64},
    "width_48": {**EARLIER, "model.ch": 48},
    "bfloat16": {**EARLIER, "model.compute_dtype": "bfloat16"},
    "default_bfloat16": {"model.compute_dtype": "bfloat16"},
    # The bound as the objective (Improved DDPM Sec. 3.3), t uniform or by importance.
    "vlb_uniform": {"model.learn_sigma": True, "training.objective": "vlb",
                    "training.loss_weighting": "uniform", "sampling.variance": "learned"},
    "vlb_importance": {"model.learn_sigma": True, "training.objective": "vlb",
                       "training.loss_weighting": "uniform", "sampling.variance": "learned",
                       "training.timestep_sampling": "importance"},
}
# Another sampler with the same 50 network calls, on a variant's trained checkpoint:
# (trained variant, sampling overrides).
ETA1 = {"sampling.eta": 1.0}
SAMPLED_VARIANTS = {
    "earlier_default_eta1": ("earlier_default", ETA1),
    "earlier_default_eta1_quadratic": ("earlier_default", {**ETA1, "sampling.spacing": "quadratic"}),
    "min_snr_eta1": ("min_snr", ETA1),
    "min_snr_eta1_quadratic": ("min_snr", {**ETA1, "sampling.spacing": "quadratic"}),
    "min_snr_eta1_logsnr": ("min_snr", {**ETA1, "sampling.spacing": "logsnr"}),
    "learned_sigma_eta1": ("learned_sigma", {**ETA1, "sampling.variance": "learned"}),
    "min_snr_eta1_quadratic_dynamic": ("min_snr", {**ETA1, "sampling.spacing": "quadratic",
                                                   "sampling.thresholding": "dynamic"}),
}


def _flags(overrides: dict) -> list[str]:
  return [f"--config.{key}={value}" for key, value in overrides.items()]


def _run(command: list[str], log_path: str) -> float:
  """Runs `command` with its output in log_path; returns its wall time in seconds."""
  started = time.perf_counter()
  with open(log_path, "w") as log:
    result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=False)
  if result.returncode:
    raise RuntimeError(f"{' '.join(command)} failed with {result.returncode}; see {log_path}.")
  return time.perf_counter() - started


def train(name: str, root: str) -> float:
  """Trains variant `name` into root/name unless it is there; its training wall time."""
  workdir = os.path.join(root, name)
  timing = os.path.join(workdir, "train_seconds.json")
  if os.path.exists(timing):
    with open(timing) as f:
      return json.load(f)["seconds"]
  os.makedirs(workdir, exist_ok=True)
  command = [sys.executable, "main.py", "--config=configs/mnist.py", f"--workdir={workdir}",
             "--config.training.eval_every_steps=0", *_flags(VARIANTS[name])]
  seconds = _run(command, os.path.join(root, f"{name}_train.log"))
  with open(timing, "w") as f:
    json.dump({"seconds": seconds, "command": command}, f)
  return seconds


def score(name: str, root: str, classifier: str, sampling: dict) -> dict:
  """`--mode=eval` of variant `name` in the classifier's features, drawn with the config's
  sampler changed by `sampling`; the results JSON."""
  workdir = os.path.join(root, name)
  command = [sys.executable, "main.py", "--mode=eval", "--config=configs/mnist.py",
             f"--workdir={workdir}", f"--config.eval.classifier={classifier}",
             *_flags(VARIANTS[name]), *_flags(sampling)]
  _run(command, os.path.join(root, f"{name}{'_'.join([''] + sorted(sampling))}_eval.log"))
  eval_dir = os.path.join(workdir, "eval")
  newest = max((f for f in os.listdir(eval_dir) if f.endswith(".json")),
               key=lambda f: os.path.getmtime(os.path.join(eval_dir, f)))
  with open(os.path.join(eval_dir, newest)) as f:
    return json.load(f)


def print_report(root: str) -> None:
  rows = []
  with open(os.path.join(root, "results.jsonl")) as f:
    for line in f:
      r = json.loads(line)
      keys = {flag.split("=")[0] for flag in r["overrides"]}
      # Against the earlier recipe: every key it sets that the row does not, at its value.
      change = [f for f in r["overrides"] if f not in _flags(EARLIER)] + [
          f for f in _flags(EARLIER) if f.split("=")[0] not in keys]
      rows.append([r["variant"], " ".join(f[len("--config."):] for f in change) or "-",
                   f"{r['seconds']:.0f}",
                   r["steps"], f"{r['feature_distance']:.1f}", f"{r['classifier_score']:.2f}",
                   f"{r['precision']:.3f}", f"{r['recall']:.3f}",
                   " ".join(str(c) for c in r["label_histogram"])])
  common.print_table(["variant", "change from earlier_default", "train s", "steps", "feature distance",
                      "classifier score", "precision", "recall", "digits 0-9"], rows)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--root", required=True, help="directory of the variants' workdirs")
  parser.add_argument("--classifier", help="the one feature-classifier .npz every row uses")
  parser.add_argument("--variants", default="default", help=f"comma-separated: {list(VARIANTS)}")
  parser.add_argument("--report", action="store_true", help="only print the table from ROOT")
  args = parser.parse_args()
  os.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  if not args.report:
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS and n not in SAMPLED_VARIANTS]
    if unknown:
      parser.error(f"unknown variants {unknown}; allowed: {list(VARIANTS)} and "
                   f"{list(SAMPLED_VARIANTS)}")
    if not args.classifier or not os.path.exists(args.classifier):
      parser.error(f"--classifier must name an existing .npz, got {args.classifier!r}")
    os.makedirs(args.root, exist_ok=True)
    for name in names:
      trained, sampling = SAMPLED_VARIANTS.get(name, (name, {}))
      seconds = train(trained, args.root)
      results = score(trained, args.root, os.path.abspath(args.classifier), sampling)
      with open(os.path.join(args.root, "results.jsonl"), "a") as f:
        f.write(json.dumps({"variant": name,
                            "overrides": _flags({**VARIANTS[trained], **sampling}),
                            "seconds": seconds, "steps": results.get("protocol.step"),
                            **results}) + "\n")
  print(common.machine_description())
  print_report(args.root)


if __name__ == "__main__":
  main()
