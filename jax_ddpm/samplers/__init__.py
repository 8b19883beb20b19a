"""Reverse-process samplers, each run as one compiled `lax.scan` (base.py), chosen by name.

The samplers know nothing about networks: they take `denoise_fn(x_t, t) -> output`, where t is an
int32 array of shape [batch] of timestep indices and the output is an eps, x_0 or v prediction.

  ddpm          Ho et al. 2020, Algorithm 2 (ddpm.py)
  ddim          Song et al. 2021, eq. (12) and (16) (ddim.py)
  dpmpp_2m      DPM-Solver++(2M), Lu et al. 2022, Algorithm 2 (dpm_solver.py)
  sde_dpmpp_2m  its stochastic form, SDE-DPM-Solver++(2M) (dpm_solver.py)
  unipc         UniPC, Zhao et al. 2023: UniP-p and UniC-p, B(h) = e^h - 1 (unipc.py)
  euler         Euler on Karras et al. 2022's sigma grid; with s_churn their Algorithm 2 (karras.py)
  heun          Heun, Karras et al. 2022, Algorithm 1 (2 calls a step); with s_churn Algorithm 2
  euler_ancestral  Euler with the DDPM posterior's noise at each step (karras.py)

registry.py maps the names to the classes; program.py compiles a sampler with a network's
weights as an argument and draws images with it.
"""
