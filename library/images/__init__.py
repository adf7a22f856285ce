"""Image files in and out: input images and masks, region masks, output file names and atomic
saves, metadata, file hashes.
"""
