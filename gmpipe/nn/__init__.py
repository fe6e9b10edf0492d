"""Network architectures: the KL autoencoder, the latent denoiser and its size presets, the patch discriminator, the
frozen text encoder and the frozen image feature networks (perceptual loss and evaluation metrics)."""
