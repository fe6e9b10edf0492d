"""Autoencoder losses: the ELBO (``elbo``), adversarial losses (``gan``), the perceptual distance
(``perceptual``) and their combination for training (``autoencoder_loss``)."""
