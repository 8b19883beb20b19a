"""jax_ddpm: denoising diffusion models (DDPM, DDIM) in JAX and Flax NNX."""
