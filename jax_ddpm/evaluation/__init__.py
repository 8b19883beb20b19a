"""Measuring models: feature networks, FID/KID/IS, precision/recall, bits/dim, pictures."""
