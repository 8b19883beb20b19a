"""Every config key with its default; the per-setup configs override a few of them.

Keys (override any on the command line: --config.training.batch_size=64):
  seed                     base PRNG seed; data order, noise and dropout derive from it and the step
  data.source              mnist_embedded | idx | folder | tfds | fake  (see input_pipeline.py)
  data.tfds_name, .split, .data_dir   TFDS dataset, split and local data directory (source=tfds)
  data.path                directory of IDX files or images (source=idx or folder)
  data.image_size, .channels  shape the source must yield (H = W = image_size)
  data.random_flip         random horizontal flips (DDPM Sec. 4 for CIFAR-10)
  data.fake_size           number of random images of source=fake
  diffusion.schedule       linear | quadratic | cosine | sigmoid
  diffusion.num_timesteps  T
  diffusion.beta_start, .beta_end   endpoints of the linear/quadratic/sigmoid schedules
  diffusion.prediction     eps | x0 | v: what the network predicts (eps in the paper)
  model.*                  jax_ddpm.models.unet.UNetConfig fields (image size and channels follow data)
  model.num_classes        C: a class-conditional model on the data's labels 0..C-1 (unset:
                           unconditional); see jax_ddpm/guidance.py
  model.learn_sigma        the network also outputs its reverse variance, interpolating beta_t and
                           beta~_t (Improved DDPM eq. 15), trained with L_hybrid (eq. 16, lambda =
                           training.vlb_weight); sample with sampling.variance = "learned"
  optim.learning_rate, .warmup_steps   Adam step size, linearly warmed up from 0
  optim.lr_decay           after warm-up: constant (DDPM) | cosine (to 0 at the last step) |
                           wsd (constant, then linearly to 0 over the last .decay_fraction of
                           the steps)
  optim.grad_clip_norm     clip the global gradient norm (DDPM: 1.0); 0 disables
  optim.adam_b1, .adam_b2, .adam_eps
  optim.ema_decay          decay of the parameter EMA used for sampling (DDPM: 0.9999)
  optim.ema_warmup         use min(decay, (1 + step) / (10 + step)) so short runs sample well
                           (below 0.9999 until step ~90,000; configs/cifar10.py turns it off)
  training.batch_size      global batch over all devices and processes
  training.num_train_steps
  training.steps_per_dispatch   k train steps per compiled call (lax.scan), for TPUs (slow on CPU)
  training.log_every_steps, .checkpoint_every_steps, .keep_checkpoints
  training.sample_every_steps, .num_sample_images, .sample_ddim_steps   DDIM (eta 0) sample
                           grids on sampling.spacing from the EMA params, written during training
  training.label_dropout   conditional models: probability that a training label is replaced by
                           the null label, so the model also learns p(x) (Ho & Salimans 2022)
  training.eval_every_steps   measure sample quality from the EMA weights every this many steps
                           (0: off): training.eval_num_samples images drawn with config.sampling
                           (training.eval_num_steps network calls if > 0), scored in
                           eval.feature_net features as train_eval/ scalars (training_eval.py);
                           a classifier for it is trained at the start for
                           training.eval_classifier_steps steps
  training.loss_weighting  uniform (DDPM eq. 14) | min_snr (Hang et al. 2023, .min_snr_gamma) |
                           p2 (Choi et al. 2022, .p2_gamma, .p2_k): the weight of each timestep's
                           squared error, for any diffusion.prediction (diffusion.loss_weights)
  training.objective       simple: L_simple (DDPM eq. 14; + lambda L_vlb with model.learn_sigma, i.e.
                           L_hybrid) | vlb: L_vlb alone, the bound's T L_t in bits/dim through mean
                           and variance (Improved DDPM Sec. 3.3; needs model.learn_sigma)
  training.timestep_sampling   uniform (DDPM Algorithm 1) | importance: t with p_t ~ sqrt(E[L_t^2])
                           over each t's last 10 losses (Improved DDPM eq. 18; objective vlb only;
                           jax_ddpm/timestep_sampling.py)
  training.max_timestep    train on t ~ U{0..max_timestep} only (None: every t < T); every sampler
                           the config names must then start at or below it (checked)
  training.nonfinite_policy   halt | skip: on a non-finite loss or gradient, stop with an error
                           naming the step, or withhold that update and count it (nonfinite_steps)
  training.restore_fallback   if the newest checkpoint cannot be read, move it to
                           checkpoints_unreadable/ and resume from the previous one
  eval.feature_net         inception (FID) | classifier (feature distance; see evaluate.py)
  eval.num_samples, .batch_size   images scored (drawn with config.sampling unless eval.samples
                           names an .npz) and the global batch of the feature network
  eval.reference_split     split of config.data whose statistics are the reference
  eval.reference_stats     an .npz (mu, sigma) to use instead (default: computed, cached in
                           workdir/eval/)
  eval.manifold_reference  reference images (a seeded subset of the split) that precision,
                           recall, density, coverage and KID compare the samples with; 0: off
  eval.kid_subsets, .kid_subset_size   KID's random subsets (standard: 100 of 1000)
  eval.inception_weights   converted FID Inception .npz (default ~/.cache/jax_ddpm/...)
  eval.inception_score     with feature_net=inception: also the Inception Score (10 splits;
                           needs the softmax layer: --mode=import_inception from TensorFlow's
                           inception-2015-12-05.tgz, see fid_weights.py)
  eval.classifier          feature classifier .npz (default workdir/feature_classifier.npz),
                           trained by --mode=train_classifier for .classifier_steps steps at
                           global batch .classifier_batch_size
  eval.bits_per_dim        also the negative log-likelihood bound in bits/dim (DDPM Table 2) of
                           eval.bpd_images images (0: all) of split eval.bpd_split of config.data,
                           with eval.bpd_timesteps stratified KL terms per image (0: all T, exact;
                           see likelihood.py); eval.num_samples = 0 then skips sample quality
  debug.inject_nonfinite_at_steps   fault injection for tests: make these steps' loss NaN
  sampling.sampler         ddim | ddpm | dpmpp_2m (DPM-Solver++(2M)) | sde_dpmpp_2m (its SDE
                           form); see jax_ddpm/samplers/
  sampling.num_steps       S, the network calls of ddim and the dpmpp samplers (ddpm visits all T)
  sampling.eta             ddim's noise scale in [0, 1] (0: deterministic)
  sampling.spacing         uniform | quadratic | logsnr: which S of the T timesteps ddim and the
                           dpmpp samplers visit (logsnr: uniform in log alpha_t / sigma_t)
  sampling.variance        ddpm's sigma_t^2: fixed_large (beta_t, the default), fixed_small
                           (beta~_t) or learned (model.learn_sigma's; also ddim's noise if eta > 0)
  sampling.thresholding    none | static (clip predicted x_0 to [-1, 1]) | dynamic (Imagen's
                           per-sample percentile, .threshold_percentile), for every sampler
  sampling.labels          conditional models: grid (one run of each class per batch) | random |
                           a comma-separated list of classes ("3,3,7"), repeated over the batch
  sampling.guidance_scale  classifier-free guidance w: 1 conditional, 0 unconditional, > 1 more
                           class-like (Ho & Salimans 2022 eq. 6 with their w = ours - 1)
  sampling.use_ema, .num_samples, .batch_size, .seed   --mode=sample: which weights, how many
                           images, the global batch per compiled call, and the noise seed
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.data = data = ml_collections.ConfigDict()
  data.source = "mnist_embedded"
  data.tfds_name = ""
  data.split = "train"
  data.data_dir = ""
  data.path = ""
  data.image_size = 28
  data.channels = 1
  data.random_flip = False
  data.fake_size = 1024

  config.diffusion = diffusion = ml_collections.ConfigDict()
  diffusion.schedule = "linear"
  diffusion.num_timesteps = 1000
  diffusion.beta_start = 1e-4
  diffusion.beta_end = 0.02
  diffusion.prediction = "eps"

  config.model = model = ml_collections.ConfigDict()
  model.ch = 32
  model.ch_mult = (1, 2, 2)
  model.num_res_blocks = 1
  model.attn_resolutions = (7,)
  model.dropout = 0.0
  model.num_groups = 8
  model.attention_head_dim = ml_collections.config_dict.placeholder(int)
  model.num_classes = ml_collections.config_dict.placeholder(int)
  model.learn_sigma = False
  # float32 | bfloat16 | auto (bfloat16 where the hardware computes it natively: TPU, GPU of
  # compute capability >= 8.0, CPU with AMX or AVX512-BF16; builders.compute_dtype). bfloat16 ran
  # 9-22% slower on a CPU without native bf16, 0-12% faster with AMX (benchmarks/NOTES.md, 2, 11).
  model.compute_dtype = "float32"
  # Off: 12-16% slower and no memory saved at the batches measured (benchmarks/NOTES.md, 8).
  model.remat = False

  config.optim = optim = ml_collections.ConfigDict()
  optim.learning_rate = 2e-4
  optim.warmup_steps = 5000
  optim.lr_decay = "constant"
  optim.decay_fraction = 0.2
  optim.grad_clip_norm = 1.0
  optim.adam_b1 = 0.9
  optim.adam_b2 = 0.999
  optim.adam_eps = 1e-8
  optim.ema_decay = 0.9999
  optim.ema_warmup = True

  config.training = training = ml_collections.ConfigDict()
  training.batch_size = 128
  training.num_train_steps = 800_000
  # 1: on XLA's CPU backend a lax.scan of 4 train steps ran 15x slower (benchmarks/NOTES.md, 6).
  training.steps_per_dispatch = 1
  training.log_every_steps = 100
  training.checkpoint_every_steps = 5000
  training.keep_checkpoints = 3
  training.sample_every_steps = 10_000
  training.num_sample_images = 64
  training.sample_ddim_steps = 50
  training.eval_every_steps = 0
  training.eval_num_samples = 2048 + 256
  training.eval_num_steps = 0
  training.eval_classifier_steps = 300
  training.label_dropout = 0.1
  training.loss_weighting = "uniform"
  training.min_snr_gamma = 5.0
  training.p2_gamma = 1.0
  training.p2_k = 1.0
  training.vlb_weight = 0.001
  training.objective = "simple"
  training.timestep_sampling = "uniform"
  training.max_timestep = ml_collections.config_dict.placeholder(int)
  training.nonfinite_policy = "halt"
  training.restore_fallback = False

  config.sampling = sampling = ml_collections.ConfigDict()
  sampling.sampler = "ddim"
  sampling.num_steps = 50
  sampling.eta = 0.0
  sampling.spacing = "uniform"
  sampling.variance = "fixed_large"
  sampling.thresholding = "static"
  sampling.threshold_percentile = 0.995
  sampling.labels = "grid"
  sampling.guidance_scale = 1.0
  sampling.use_ema = True
  sampling.num_samples = 64
  sampling.batch_size = 64
  sampling.seed = 0

  config.eval = ev = ml_collections.ConfigDict()
  ev.feature_net = "inception"
  ev.num_samples = 10_000
  ev.batch_size = 64
  ev.reference_split = "train"
  ev.reference_stats = ""
  ev.samples = ""
  ev.inception_weights = ""
  ev.inception_score = False
  ev.classifier = ""
  ev.manifold_reference = 10_000
  ev.kid_subsets = 100
  ev.kid_subset_size = 1000
  ev.classifier_steps = 2000
  ev.classifier_batch_size = 128
  ev.bits_per_dim = False
  ev.bpd_split = "test"
  ev.bpd_images = 0
  ev.bpd_timesteps = 0

  config.debug = debug = ml_collections.ConfigDict()
  debug.inject_nonfinite_at_steps = ()
  return config


def make_conditional(config: ml_collections.ConfigDict, grid_images_per_class: int):
  """`config` made class-conditional on its data's 10 labels, for classifier-free guidance:
  label dropout 0.1 (Ho & Salimans 2022 used 0.1-0.2), training grids with one row per class,
  and samples from DPM-Solver++(2M) in 20 logsnr steps with guidance w = 2 and "grid" labels."""
  config.model.num_classes = 10
  config.training.label_dropout = 0.1
  config.training.num_sample_images = 10 * grid_images_per_class
  config.sampling.sampler = "dpmpp_2m"
  config.sampling.num_steps = 20
  config.sampling.spacing = "logsnr"
  config.sampling.labels = "grid"
  config.sampling.guidance_scale = 2.0
  return config
