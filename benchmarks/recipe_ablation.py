"""Which training recipe draws the best digits in the default run's budget: an ablation table.

  python benchmarks/recipe_ablation.py --root=/tmp/ablation --classifier=CLASSIFIER.npz \
      --variants=earlier_default,min_snr,learned_sigma,min_snr_eta1

Each variant is configs/mnist.py as this ablation found it (width 32, 3000 steps, a constant step:
BASE) with a few keys changed (VARIANTS). For each, the script runs the README's training command
into ROOT/<variant> (timed; training.eval_every_steps = 0 so that every row pays for training only),
then `--mode=eval` with the one classifier file given, so that every row is scored in the same
features: the feature distance to the 5000 training digits, the classifier's score (its
Inception-Score analogue, at most 10) and the histogram of predicted digits, for eval.num_samples
images drawn by the config's own sampler (DDIM-50 by default; the SAMPLED_VARIANTS draw from a
trained variant with other sampler settings, or from one of its earlier checkpoints).

One draw of 1000 samples moves the feature distance by several units (the default's checkpoint
scored 50.1, 65.4 and 67.9 with sampling seeds 0, 1 and 2), so --sample_seeds scores each variant
with several sampling seeds and the table gives their mean and standard deviation.

A variant whose checkpoint already exists is not trained again (its recorded time is reused), and
a (variant, sampling seed) already in ROOT/results.jsonl is not scored again, so an interrupted
ablation resumes. results.jsonl keeps one line per scored (variant, seed); --report prints the
table from it without running anything.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common

# The network, budget, constant step, DDIM sampler and training on every t (T - 1 = 999 is the
# largest) of configs/mnist.py while this ablation ran: every row uses them unless the row says
# otherwise. (The file became width 16 for 5000 steps, the `default_width_16*` rows, then decayed
# its step, the `width_16_wsd*` rows, sampled with SDE-DPM-Solver++(2M), the `*_sde_dpmpp_2m`
# rows, and trained up to t = 800 only, the `*_max_t_800*` rows, after them.)
BASE = {
  "model.ch": 32,
  "training.num_train_steps": 3000,
  "optim.lr_decay": "constant",
  "sampling.sampler": "ddim",
  "training.max_timestep": 999,
}
# configs/mnist.py before this ablation chose its recipe: the DDPM paper's uniform weighting and
# deterministic DDIM-50 on uniform spacing. Every variant is stated as overrides of the current
# file, so each row can be run again as it was.
EARLIER = {"training.loss_weighting": "uniform", "sampling.eta": 0.0, "sampling.spacing": "uniform"}
# The recipe the first round chose (the file's from then on): Min-SNR-5, DDIM-50 at eta 1 on
# quadratic spacing ("default" in the rows' names, and the `default` variant on BASE). The
# default_* rows are changes of it, stated in full for the same reason.
MIN_SNR_RECIPE = {
  "training.loss_weighting": "min_snr",
  "sampling.eta": 1.0,
  "sampling.spacing": "quadratic",
}
# That recipe on a network half as wide for 5000 steps, about the same wall time: configs/mnist.py
# since the width rows below.
WIDTH_16 = {**MIN_SNR_RECIPE, "model.ch": 16, "training.num_train_steps": 5000}
WIDTH_16_P2 = {**WIDTH_16, "training.loss_weighting": "p2"}
# The width-16 default with 64 channels at 7 x 7 (from 32), every checkpoint kept.
WIDTH_16_MULT_124 = {**WIDTH_16, "model.ch_mult": (1, 2, 4), "training.keep_checkpoints": 12}
WIDTH_16_WSD = {**WIDTH_16, "optim.lr_decay": "wsd"}
WIDTH_16_WSD_MAX_T_800 = {**WIDTH_16_WSD, "training.max_timestep": 800}
SDE_QUADRATIC = {"sampling.sampler": "sde_dpmpp_2m", "sampling.spacing": "quadratic"}
VARIANTS = {
  "default": MIN_SNR_RECIPE,
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
  "default_bfloat16": {**MIN_SNR_RECIPE, "model.compute_dtype": "bfloat16"},
  "default_lr_cosine": {**MIN_SNR_RECIPE, "optim.lr_decay": "cosine"},
  "default_v": {**MIN_SNR_RECIPE, "diffusion.prediction": "v"},
  # Sampled on the recipe's quadratic spacing, which under this schedule starts from noise at
  # t = 800, where sqrt(alpha-bar) = 0.31: a mismatch the checks refuse now (REFUSED).
  "default_cosine_schedule": {**MIN_SNR_RECIPE, "diffusion.schedule": "cosine"},
  # Half the batch, twice the steps: about the same wall time on a 2-core CPU, where a step
  # of 16 images ran 2.3x as fast as one of 32 (benchmarks/run.py, same load; 1124 s against
  # 1112 s for 3000 steps of 32 in the ablation).
  "default_batch_16": {
    **MIN_SNR_RECIPE,
    "training.batch_size": 16,
    "training.num_train_steps": 6000,
  },
  # The default trained from other seeds: how far training runs of one recipe differ.
  "default_seed1": {**MIN_SNR_RECIPE, "seed": 1},
  "default_seed2": {**MIN_SNR_RECIPE, "seed": 2},
  # P2 weighting (Choi et al. 2022, gamma = k = 1) in place of Min-SNR-5.
  "default_p2": {**MIN_SNR_RECIPE, "training.loss_weighting": "p2"},
  # Model width at the default's wall time: steps scaled by the measured training speed
  # (benchmarks/run.py, batch 32, 2 XLA devices: 3.00 steps/s at ch 32, 4.44 at 24, 1.49 at 48).
  "default_width_24": {**MIN_SNR_RECIPE, "model.ch": 24, "training.num_train_steps": 4400},
  # (Width 48 was stopped at step 100: 1.14 steps/s in main.py, so 1500 steps overshoot.)
  "default_width_48": {**MIN_SNR_RECIPE, "model.ch": 48, "training.num_train_steps": 1500},
  # Narrower still, every checkpoint kept, so that the one at the default's wall time can be
  # scored (SAMPLED_VARIANTS) beside the last.
  "default_width_16": {
    **WIDTH_16,
    "training.num_train_steps": 6000,
    "training.keep_checkpoints": 12,
  },
  # Width 16 at the default's wall time (5000 steps, the step scored above) from other
  # training seeds: whether one run's lead holds (it did: configs/mnist.py is this since).
  "default_width_16_seed1": {**WIDTH_16, "seed": 1},
  "default_width_16_seed2": {**WIDTH_16, "seed": 2},
  # The new default with P2 weighting, which matched Min-SNR-5 at width 32, from training
  # seeds 0, 1 and 2, as the width-16 rows were replicated.
  "width_16_p2": WIDTH_16_P2,
  "width_16_p2_seed1": {**WIDTH_16_P2, "seed": 1},
  "width_16_p2_seed2": {**WIDTH_16_P2, "seed": 2},
  # Min-SNR's clamp at SNR 2 rather than the paper's 5: less weight on the low-noise steps.
  "width_16_min_snr_2": {**WIDTH_16, "training.min_snr_gamma": 2.0},
  # Adam's step decayed to 0 by a cosine, on the width-16 default.
  "width_16_lr_cosine": {**WIDTH_16, "optim.lr_decay": "cosine"},
  # Twice Adam's step: a narrow network limited by its steps may take a larger one.
  "width_16_lr_2e-3": {**WIDTH_16, "optim.learning_rate": 2e-3},
  # A longer EMA: at 5000 steps the same EMA weights, since the warm-up (1 + t) / (10 + t)
  # stays below 0.999 until step 8990 (README).
  "width_16_ema_0.9995": {**WIDTH_16, "optim.ema_decay": 0.9995},
  # ... and one without the warm-up, so that 0.999 binds from the start: a longer average
  # (1 / (1 - d): 1000 steps, against the warm-up's (10 + t) / 9, 557 at step 5000).
  "width_16_ema_no_warmup": {**WIDTH_16, "optim.ema_warmup": False},
  # ... and a shorter one: 0.995 binds from step 1790, a window of 200 steps.
  "width_16_ema_0.995": {**WIDTH_16, "optim.ema_decay": 0.995},
  # Twice the batch, every checkpoint kept (SAMPLED_VARIANTS scores the one at the default's
  # wall time).
  "width_16_batch_64": {**WIDTH_16, "training.batch_size": 64, "training.keep_checkpoints": 12},
  # The capacity at 7 x 7 paid for at 14 x 14 (16 channels there, from 32: a quarter of that
  # level's convolution cost); 1000 steps more than the default, every checkpoint kept, to score
  # the one at the default's wall time.
  "width_16_mult_114": {
    **WIDTH_16,
    "model.ch_mult": (1, 1, 4),
    "training.num_train_steps": 6000,
    "training.keep_checkpoints": 12,
  },
  # The x_0 target with Min-SNR-5's x_0 weight, min(SNR, 5): the same weighted error as the
  # default's, through the other parametrization of the network's output.
  "width_16_x0": {**WIDTH_16, "diffusion.prediction": "x0"},
  # Adam's second-moment average over about 100 steps instead of 1000: a short run's gradient
  # scale changes faster than the paper's 0.999 follows.
  "width_16_adam_b2_0.99": {**WIDTH_16, "optim.adam_b2": 0.99},
  # More channels where the image is smallest (64 at 7 x 7, from 32): capacity at little cost,
  # since a 3 x 3 convolution there costs what one at 28 x 28 with 16 channels does. Every
  # checkpoint kept, to score the one at the default's wall time.
  "width_16_mult_124": WIDTH_16_MULT_124,
  "width_16_mult_124_seed1": {**WIDTH_16_MULT_124, "seed": 1},
  "width_16_mult_124_seed2": {**WIDTH_16_MULT_124, "seed": 2},
  # ... without its four attention layers at 7 x 7, to win back the 9% of time per step that
  # the 64 channels cost.
  "width_16_mult_124_no_attn": {**WIDTH_16_MULT_124, "model.attn_resolutions": ()},
  # Warmup-stable-decay: the constant step, then linearly to 0 over the last 20% of the steps
  # (`optim.lr_decay=wsd`), a decay at the end only, where the cosine spends the whole run.
  "width_16_wsd": WIDTH_16_WSD,
  "width_16_wsd_seed1": {**WIDTH_16_WSD, "seed": 1},
  "width_16_wsd_seed2": {**WIDTH_16_WSD, "seed": 2},
  # ... decayed over the last 40% instead of 20%.
  "width_16_wsd_decay_0.4": {**WIDTH_16_WSD, "optim.decay_fraction": 0.4},
  # ... with twice the held step, which the decay may let settle.
  "width_16_wsd_lr_2e-3": {**WIDTH_16_WSD, "optim.learning_rate": 2e-3},
  # Both: the (1, 2, 4) network for the 4500 steps of the default's wall time, its step
  # decayed over the last 900.
  "width_16_mult_124_wsd_4500": {
    **WIDTH_16_MULT_124,
    "optim.lr_decay": "wsd",
    "training.num_train_steps": 4500,
  },
  # Trained on t <= 800 only (`training.max_timestep`): quadratic spacing's first timestep, so
  # the sampler visits no t above it, and the steps spent on t in 801..999 go to the rest.
  "width_16_wsd_max_t_800": WIDTH_16_WSD_MAX_T_800,
  "width_16_wsd_max_t_800_seed1": {**WIDTH_16_WSD_MAX_T_800, "seed": 1},
  "width_16_wsd_max_t_800_seed2": {**WIDTH_16_WSD_MAX_T_800, "seed": 2},
  # Improved DDPM's cosine schedule sampled on uniform spacing, which starts at t = 980, where
  # sqrt(alpha-bar) = 0.03. (Quadratic spacing stops at t = 800, where the cosine schedule's
  # sqrt(alpha-bar) is 0.31, so `default_cosine_schedule` drew from a mismatched start;
  # samplers/base.check_start now refuses it.)
  "width_16_cosine_schedule": {
    **WIDTH_16,
    "diffusion.schedule": "cosine",
    "sampling.spacing": "uniform",
  },
  # The bound as the objective (Improved DDPM Sec. 3.3), t uniform or by importance.
  "vlb_uniform": {
    **MIN_SNR_RECIPE,
    "model.learn_sigma": True,
    "training.objective": "vlb",
    "training.loss_weighting": "uniform",
    "sampling.variance": "learned",
  },
  "vlb_importance": {
    **MIN_SNR_RECIPE,
    "model.learn_sigma": True,
    "training.objective": "vlb",
    "training.loss_weighting": "uniform",
    "sampling.variance": "learned",
    "training.timestep_sampling": "importance",
  },
}
# Variants whose rows were measured before a check that now refuses their config, kept so that
# the README's rows still name what ran: variant -> what the ConfigError says.
REFUSED = {
  "default_cosine_schedule": "sampling.spacing='quadratic' under diffusion.schedule='cosine'"
}
# Another sampler (the same 50 network calls unless said) on a variant's trained checkpoint:
# (trained variant, sampling overrides).
ETA1 = {"sampling.eta": 1.0}
SAMPLED_VARIANTS = {
  "earlier_default_eta1": ("earlier_default", ETA1),
  "earlier_default_eta1_quadratic": ("earlier_default", {**ETA1, "sampling.spacing": "quadratic"}),
  "min_snr_eta1": ("min_snr", ETA1),
  "min_snr_eta1_quadratic": ("min_snr", {**ETA1, "sampling.spacing": "quadratic"}),
  "min_snr_eta1_logsnr": ("min_snr", {**ETA1, "sampling.spacing": "logsnr"}),
  "learned_sigma_eta1": ("learned_sigma", {**ETA1, "sampling.variance": "learned"}),
  "min_snr_eta1_quadratic_dynamic": (
    "min_snr",
    {**ETA1, "sampling.spacing": "quadratic", "sampling.thresholding": "dynamic"},
  ),
  # Twice the network calls (so not at the default's sampling cost): what they would buy.
  "min_snr_eta1_quadratic_100": (
    "min_snr",
    {**ETA1, "sampling.spacing": "quadratic", "sampling.num_steps": 100},
  ),
  # An earlier checkpoint of a trained variant (constant step size: the state at step N is the
  # one a run of N steps ends with); its time is the run's up to that step (`seconds_until`).
  # Width 24 trains at 3.3 steps/s in main.py against 2.8 at width 32, not the 4.44 / 3.00 of
  # the bare step, so 3500 steps, not 4400, are the default's wall time.
  "default_width_24_step3500": ("default_width_24", {}, 3500),
  "default_width_16_step5000": ("default_width_16", {}, 5000),
  # ... and at step 4500, beside the (1, 2, 4) network's checkpoint at that step.
  "default_width_16_step4500": ("default_width_16", {}, 4500),
  # Batch 64 ran 5.0 steps/s against 9.0 at batch 32 (2-core AMD EPYC): the width-16
  # default's 5000 steps took as long as 2500-3000 of these.
  "width_16_batch_64_step2500": ("width_16_batch_64", {}, 2500),
  "width_16_batch_64_step3000": ("width_16_batch_64", {}, 3000),
  # (1, 2, 4) ran at 0.91x the default's speed: step 4500 at uptime 591 s against the
  # default's 5000 at 600 s (2-core AMD EPYC).
  "width_16_mult_124_step4500": ("width_16_mult_124", {}, 4500),
  "width_16_mult_124_seed1_step4500": ("width_16_mult_124_seed1", {}, 4500),
  "width_16_mult_124_seed2_step4500": ("width_16_mult_124_seed2", {}, 4500),
  # (1, 1, 4) ran at 1.06x the default's speed: step 5000 at uptime 564 s and 5500 at 623 s,
  # against the default's 5000 at 600 s (same machine), so both are scored.
  "width_16_mult_114_step5000": ("width_16_mult_114", {}, 5000),
  "width_16_mult_114_step5500": ("width_16_mult_114", {}, 5500),
  # The cosine schedule's run on log-SNR spacing (DPM-Solver's), to t = 999.
  "width_16_cosine_schedule_logsnr": ("width_16_cosine_schedule", {"sampling.spacing": "logsnr"}),
  # The decayed run's online weights instead of their EMA: once the step has decayed to 0 the
  # last weights may need no average.
  "width_16_wsd_online": ("width_16_wsd", {"sampling.use_ema": False}),
  # The decayed run with the stochastic second-order solver (SDE-DPM-Solver++(2M), whose first
  # order is the default's DDIM eta = 1), on the default's quadratic spacing and on log-SNR.
  "width_16_wsd_sde_dpmpp_2m": ("width_16_wsd", SDE_QUADRATIC),
  "width_16_wsd_seed1_sde_dpmpp_2m": ("width_16_wsd_seed1", SDE_QUADRATIC),
  "width_16_wsd_seed2_sde_dpmpp_2m": ("width_16_wsd_seed2", SDE_QUADRATIC),
  # The runs trained up to t = 800, sampled so too: the new configs/mnist.py.
  "width_16_wsd_max_t_800_sde_dpmpp_2m": ("width_16_wsd_max_t_800", SDE_QUADRATIC),
  "width_16_wsd_max_t_800_seed1_sde_dpmpp_2m": ("width_16_wsd_max_t_800_seed1", SDE_QUADRATIC),
  "width_16_wsd_max_t_800_seed2_sde_dpmpp_2m": ("width_16_wsd_max_t_800_seed2", SDE_QUADRATIC),
  "width_16_wsd_sde_dpmpp_2m_logsnr": (
    "width_16_wsd",
    {"sampling.sampler": "sde_dpmpp_2m", "sampling.spacing": "logsnr"},
  ),
  # The same checkpoint with DPM-Solver++(2M) on log-SNR spacing, its paper's choice, at the
  # same 50 network calls.
  "default_width_16_step5000_dpmpp_2m": (
    "default_width_16",
    {"sampling.sampler": "dpmpp_2m", "sampling.spacing": "logsnr"},
    5000,
  ),
}


def _flags(overrides: dict) -> list[str]:
  return [f"--config.{key}={value}" for key, value in overrides.items()]


def config_overrides(name: str) -> dict:
  """Trained variant `name`'s changes of configs/mnist.py: BASE, then the variant's own."""
  return {**BASE, **VARIANTS[name]}


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
  command = [
    sys.executable,
    "main.py",
    "--config=configs/mnist.py",
    f"--workdir={workdir}",
    "--config.training.eval_every_steps=0",
    *_flags(config_overrides(name)),
  ]
  seconds = _run(command, os.path.join(root, f"{name}_train.log"))
  with open(timing, "w") as f:
    json.dump({"seconds": seconds, "command": command}, f)
  return seconds


def seconds_until(name: str, root: str, step: int, seconds: float) -> float:
  """The training wall time of variant `name` up to `step`: its whole run's `seconds` less the
  time its summaries' uptime counted after that step."""
  uptime = {}
  with open(os.path.join(root, f"{name}_train.log")) as log:
    for line in log:
      if " uptime=" in line:
        at, value = line.split("] uptime=")
        uptime[int(at.rsplit("[", 1)[1])] = float(value)
  if step not in uptime:
    raise ValueError(f"{name}'s training log has no uptime at step {step}.")
  return seconds - (max(uptime.values()) - uptime[step])


def score(name: str, root: str, classifier: str, sampling: dict, step=None) -> dict:
  """`--mode=eval` of variant `name` (its checkpoint of `step`, default the last) in the
  classifier's features, drawn with the config's sampler changed by `sampling`; the results
  JSON."""
  workdir = os.path.join(root, name)
  command = [
    sys.executable,
    "main.py",
    "--mode=eval",
    "--config=configs/mnist.py",
    f"--workdir={workdir}",
    f"--config.eval.classifier={classifier}",
    *_flags(config_overrides(name)),
    *_flags(sampling),
    *[f"--step={step}"] * (step is not None),
  ]
  at = f"_step{step}" if step is not None else ""
  _run(command, os.path.join(root, f"{name}{at}{'_'.join([''] + sorted(sampling))}_eval.log"))
  eval_dir = os.path.join(workdir, "eval")
  newest = max(
    (f for f in os.listdir(eval_dir) if f.endswith(".json")),
    key=lambda f: os.path.getmtime(os.path.join(eval_dir, f)),
  )
  with open(os.path.join(eval_dir, newest)) as f:
    return json.load(f)


def _rows_by_variant(root: str) -> dict[str, list[dict]]:
  """results.jsonl's rows grouped by variant, in order of first appearance (rows written before
  --sample_seeds existed are seed 0)."""
  grouped = {}
  path = os.path.join(root, "results.jsonl")
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        r = json.loads(line)
        grouped.setdefault(r["variant"], []).append({"sample_seed": 0, **r})
  return grouped


def _mean_std(values: list[float], digits: int) -> str:
  mean = f"{statistics.mean(values):.{digits}f}"
  return mean if len(values) == 1 else f"{mean} +- {statistics.stdev(values):.{digits}f}"


def print_report(root: str) -> None:
  rows = []
  for name, runs in _rows_by_variant(root).items():
    r = runs[0]
    keys = {flag.split("=")[0] for flag in r["overrides"]}
    # Against the earlier recipe: every key it sets that the row does not, at its value.
    change = [f for f in r["overrides"] if f not in _flags(EARLIER)] + [
      f for f in _flags(EARLIER) if f.split("=")[0] not in keys
    ]
    histogram = [round(statistics.mean(c)) for c in zip(*(x["label_histogram"] for x in runs))]
    rows.append(
      [
        name,
        " ".join(f[len("--config.") :] for f in change) or "-",
        f"{r['seconds']:.0f}",
        r["steps"],
        ",".join(str(x["sample_seed"]) for x in runs),
        _mean_std([x["feature_distance"] for x in runs], 1),
        _mean_std([x["classifier_score"] for x in runs], 2),
        _mean_std([x["precision"] for x in runs], 3),
        _mean_std([x["recall"] for x in runs], 3),
        " ".join(str(c) for c in histogram),
      ]
    )
  common.print_table(
    [
      "variant",
      "change from earlier_default",
      "train s",
      "steps",
      "sampling seeds",
      "feature distance",
      "classifier score",
      "precision",
      "recall",
      "digits 0-9 (mean)",
    ],
    rows,
  )


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--root", required=True, help="directory of the variants' workdirs")
  parser.add_argument("--classifier", help="the one feature-classifier .npz every row uses")
  parser.add_argument("--variants", default="default", help=f"comma-separated: {list(VARIANTS)}")
  parser.add_argument(
    "--sample_seeds",
    default="0",
    help="comma-separated sampling seeds; each variant is scored with each",
  )
  parser.add_argument("--report", action="store_true", help="only print the table from ROOT")
  args = parser.parse_args()
  os.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  if not args.report:
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS and n not in SAMPLED_VARIANTS]
    if unknown:
      parser.error(
        f"unknown variants {unknown}; allowed: {list(VARIANTS)} and {list(SAMPLED_VARIANTS)}"
      )
    if not args.classifier or not os.path.exists(args.classifier):
      parser.error(f"--classifier must name an existing .npz, got {args.classifier!r}")
    os.makedirs(args.root, exist_ok=True)
    seeds = [int(seed) for seed in args.sample_seeds.split(",")]
    for name in names:
      trained, sampling, *step = SAMPLED_VARIANTS.get(name, (name, {}))
      step = step[0] if step else None
      seconds = train(trained, args.root)
      if step is not None:
        seconds = seconds_until(trained, args.root, step, seconds)
      scored = {r["sample_seed"] for r in _rows_by_variant(args.root).get(name, [])}
      for seed in (s for s in seeds if s not in scored):
        # Seed 0 is the config's own: its command stays the one earlier rows ran.
        reseed = {"sampling.seed": seed} if seed else {}
        results = score(
          trained, args.root, os.path.abspath(args.classifier), {**sampling, **reseed}, step
        )
        with open(os.path.join(args.root, "results.jsonl"), "a") as f:
          f.write(
            json.dumps(
              {
                "variant": name,
                "sample_seed": seed,
                "overrides": _flags({**VARIANTS[trained], **sampling}),
                "seconds": seconds,
                "steps": results.get("protocol.step"),
                **results,
              }
            )
            + "\n"
          )
  print(common.machine_description())
  print_report(args.root)


if __name__ == "__main__":
  main()
