"""Evaluation metrics, one concept per module (the frozen feature networks they read are in ``gmpipe.nn.features``).

- ``frechet``: Frechet distance between Gaussian fits of two feature sets (FID when the features are Inception's)
- ``kid``: kernel distance, unbiased MMD^2 with a cubic polynomial kernel
- ``precision_recall``: improved precision and recall from k-NN balls
- ``reconstruction``: PSNR and SSIM
- ``classifier``: a small CNN that scores class-conditional samples
"""
