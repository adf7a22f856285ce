"""Model loading: any SD 1.x / 2.x checkpoint, offline. See `loader.load_model`."""

from library.models.loader import LoadedModel, ModelKind, load_model, load_vae

__all__ = ["LoadedModel", "ModelKind", "load_model", "load_vae"]
