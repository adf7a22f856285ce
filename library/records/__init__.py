"""The frozen records every stage reads: parsed options, Jobs, limits, sampler names, Deep Shrink /
Gradual Latent settings. Imports no other stage.
"""
