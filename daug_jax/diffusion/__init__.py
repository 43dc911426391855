"""Diffusion stage: noise schedules (`schedule`), the epsilon-UNet (`unet`), the noise-aware
classifier (`classifier`), their training (`train`), DDIM translation (`sampling`) and the
classifier's strength across noise levels (`strength`)."""
