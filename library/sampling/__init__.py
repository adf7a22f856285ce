"""The denoising loop of one batch and its math: schedulers, start noise, img2img start, Highres
fix, the patch owner that features attach to, step math, NaN checks, the VAE.
"""
