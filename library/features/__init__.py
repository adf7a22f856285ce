"""Everything that changes a denoising step, one feature per module, each attached through the
patch owner (`library.sampling.patches`).
"""
