"""Models: loading HF BLIP checkpoints, the MED model, tiny configs for offline use."""
