"""Diffusion stage: noise schedules (`schedule`), the epsilon-UNet and the noise-aware classifier
(`unet`), their training (`train`), DDIM translation (`sampling`) and the classifier's strength
across noise levels (`strength`)."""
