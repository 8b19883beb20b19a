"""The samplers by name: the values of a run config's sampling.sampler.

Adding a sampler: a file with a frozen-dataclass subclass of `base.Sampler` (its options and
their checks in `__post_init__`, `from_config`, `timesteps`, `step`, and `init_state` if it keeps
state across steps), and its line here.
"""

from __future__ import annotations

from jax_ddpm.io.errors import ConfigError
from jax_ddpm.samplers.base import Sampler
from jax_ddpm.samplers.ddim import DDIM
from jax_ddpm.samplers.ddpm import DDPM
from jax_ddpm.samplers.dpm_solver import DPMSolverPP2M, SDEDPMSolverPP2M
from jax_ddpm.samplers.karras import Euler, EulerAncestral, Heun
from jax_ddpm.samplers.unipc import UniPC

REGISTRY: dict[str, type[Sampler]] = {
  DDPM.name: DDPM,
  DDIM.name: DDIM,
  DPMSolverPP2M.name: DPMSolverPP2M,
  SDEDPMSolverPP2M.name: SDEDPMSolverPP2M,
  UniPC.name: UniPC,
  Euler.name: Euler,
  Heun.name: Heun,
  EulerAncestral.name: EulerAncestral,
}


def sampler_class(name: str, key: str = "sampler") -> type[Sampler]:
  """The sampler registered as `name`; ConfigError naming `key` and the choices otherwise."""
  if name not in REGISTRY:
    raise ConfigError(f"Unknown {key} {name!r}; allowed values: {list(REGISTRY)}.")
  return REGISTRY[name]
