"""A class-conditional GAN in the autoencoder's latent space (``train_gan``): the networks (``generator``,
``discriminator``) and their folders on disk (``saving``), the adversarial losses and R1 shared with the
autoencoder (``losses``), both players as losses for the shared training loop (``loop_losses``),
per-sample-seeded sampling (``sampling``), slerp interpolation (``interpolation``) and the perceptual path length
along it (``path_length``)."""
