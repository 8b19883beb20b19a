"""Where images come from: sources and the sharded input pipeline."""
