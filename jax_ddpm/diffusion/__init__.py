"""The diffusion process: schedules, q and its posterior, losses, timestep draws, guidance."""
