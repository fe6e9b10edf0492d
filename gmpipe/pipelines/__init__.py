"""gmpipe's models as diffusers pipelines: every latent diffusion model folder (``models/ldm``, each
``models/student/<name>``) is also a diffusers pipeline folder that ``DiffusionPipeline.from_pretrained`` loads.

    scheduler          LatentDiffusionScheduler: gmpipe's objective, latent statistics and sampler as a diffusers
                       scheduler config
    latent_diffusion   LatentDiffusionPipeline (the pipeline class) and ``save_pipeline_files`` (what the stages
                       call after writing a model folder)
"""
