"""The diffusion process: schedules, the forward process and its posterior, losses, timestep draws and guidance."""
