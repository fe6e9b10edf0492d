"""The pipeline stages, one module each, in DVC order. Each module has ``SECTIONS`` (the params sections it
reads, in the order its ``run(*sections, paths)`` takes them) and ``run``, which returns a summary dict."""

STAGES = ("prepare", "train_vae", "cache_latents", "train_decoder", "train_ldm", "distill", "train_ar", "train_gan",
          "evaluate")
