"""Turning parsed options into the objects of a run: device, dtypes, model, generator, runner.

Each function takes the argparse namespace and returns one ready object, so `gen_img.py`
reads as the list of steps of a run.
"""

from __future__ import annotations

import argparse
import logging
import os
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import torch

from library import highres_fix
from library.cli import vae_batch_size
from library.controlnet import GuideImages
from library.errors import UserError
from library.img2img import SourceImages
from library.models import LoadedModel, load_model
from library.pipeline import Generator
from library.prompts import Defaults
from library.runner import OutputSettings, Runner
from library.text_encoding import PromptEncoder

logger = logging.getLogger(__name__)

DEMO_DIR = Path(__file__).resolve().parent.parent / "models"


@dataclass(frozen=True)
class Runtime:
    """Where and in which precision the networks run."""

    device: torch.device
    dtype: torch.dtype
    vae_dtype: torch.dtype
    noise_device: torch.device

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "Runtime":
        name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        try:
            device = torch.device(name)
            torch.empty(1, device=device)
        except (RuntimeError, AssertionError) as exc:
            raise UserError(f"--device {name}: not usable here ({str(exc).splitlines()[0][:120]})") from None
        dtype = torch.float16 if args.fp16 else torch.bfloat16 if args.bf16 else torch.float32
        vae_dtype = torch.float32 if args.no_half_vae else dtype
        noise_device = torch.device("cpu") if args.noise_device == "cpu" else device
        return cls(device, dtype, vae_dtype, noise_device)


def checkpoint_path(args: argparse.Namespace) -> str:
    """`--ckpt`, or the tiny demo model (written on first use) when none is given."""
    if args.ckpt:
        return args.ckpt
    from tools.make_tiny_model import make_tiny_models

    logger.warning("no --ckpt given: using the tiny demo model (random weights: the images are noise)")
    return str(make_tiny_models(DEMO_DIR, ("sd1",))["sd1"])


def load(args: argparse.Namespace, runtime: Runtime) -> LoadedModel:
    """The model of `--ckpt` (and `--vae`), on the run's device and dtypes."""
    ckpt = checkpoint_path(args)
    _start_hash(ckpt)
    return load_model(
        ckpt,
        vae=args.vae,
        dtype=runtime.dtype,
        vae_dtype=runtime.vae_dtype,
        device=runtime.device,
        v1=args.v1,
        v2=args.v2,
        v_parameterization=args.v_parameterization,
        tokenizer_cache_dir=args.tokenizer_cache_dir,
        attention="sdpa" if args.sdpa else "auto",  # library.attention: blocked on CPU bf16 unless --sdpa
    )


def optimize(args: argparse.Namespace, model: LoadedModel) -> None:
    """Attention backend and memory layout: SDPA by default, xformers on request."""
    if args.xformers or args.diffusers_xformers:
        try:
            import xformers  # noqa: F401
        except ImportError:
            raise UserError("--xformers: xformers is not installed (pip install xformers), "
                            "or leave it out to use PyTorch SDPA") from None
        model.unet.enable_xformers_memory_efficient_attention()
        model.vae.enable_xformers_memory_efficient_attention()
    if args.opt_channels_last:
        model.unet.to(memory_format=torch.channels_last)
    if getattr(args, "compile", False):
        from library.models.compiling import compile_networks

        compile_networks(model.unet, model.vae, next(model.unet.parameters()).device)


def generator(args: argparse.Namespace, model: LoadedModel, runtime: Runtime) -> Generator:
    """The Generator for this model and the options' sampler and prompt settings."""
    encoder = PromptEncoder(
        model.tokenizer,
        model.text_encoder,
        clip_skip=args.clip_skip or model.kind.default_clip_skip,
        max_embeddings_multiples=args.max_embeddings_multiples or 1,
        normalize_mode=args.emb_normalize_mode,
        embeddings=prompt_embeddings(args, model),
    )
    if args.control_net_models and encoder.embeddings is not None and encoder.embeddings.has_xti:
        raise UserError("--XTI_embeddings and --control_net_models cannot be used together yet "
                        "(XTI gives every U-Net layer its own text encoding; the ControlNet has no such layers)")
    nets = controlnets(args, model, runtime)
    return Generator(
        unet=model.unet,
        vae=model.vae,
        encoder=encoder,
        sampler=args.sampler,
        v_prediction=model.kind.v_prediction,
        device=runtime.device,
        dtype=runtime.dtype,
        noise_device=runtime.noise_device,
        ddim_eta=args.ddim_eta,
        controlnets=nets,
    )


def controlnets(args: argparse.Namespace, model: LoadedModel, runtime: Runtime):
    """`--control_net_models` loaded for this model, with their preps, weights and ratios (or None)."""
    from library.controlnet import ControlNets, ControlUnit, parse_prep, per_model
    from library.models.controlnet import load_controlnet

    names = args.control_net_models or []
    if not names:
        return None
    count = len(names)
    preps = [parse_prep(p) for p in per_model(args.control_net_preps, count, "none")]
    weights = per_model(args.control_net_weights, count, 1.0)
    ratios = per_model(args.control_net_ratios, count, 1.0)
    units = []
    for name, prep, weight, ratio in zip(names, preps, weights, ratios):
        net = load_controlnet(name, model.unet, runtime.dtype, runtime.device)
        units.append(ControlUnit(net, Path(name).name, prep, weight, ratio))
        logger.info("ControlNet %s: preprocessing %s, weight %g, ratio %g", Path(name).name, prep.label, weight, ratio)
    return ControlNets(units)


def prompt_embeddings(args: argparse.Namespace, model: LoadedModel):
    """`--textual_inversion_embeddings` / `--XTI_embeddings` as an EmbeddingSet (None without them).

    With XTI files the U-Net is hooked to take one text encoding per cross-attention layer.
    """
    from library.embeddings import load_embeddings
    from library.xti import PerLayerConditioning

    ti_files = getattr(args, "textual_inversion_embeddings", None) or []
    xti_files = getattr(args, "XTI_embeddings", None) or []
    embeddings = load_embeddings(ti_files, xti_files, model.text_encoder, model.unet)
    if embeddings is not None and embeddings.has_xti:
        PerLayerConditioning(model.unet, embeddings.layer_names)
    return embeddings


def runner(args: argparse.Namespace, model: LoadedModel, gen: Generator, before_batch=None) -> Runner:
    """A Runner writing into `--outdir` with this run's metadata."""
    outdir = Path(args.outdir)
    try:
        outdir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--outdir {outdir}: cannot create it ({exc.strerror})") from None
    output = OutputSettings(
        outdir=outdir,
        sampler=args.sampler,
        sequential=args.sequential_file_name,
        model_name=model.name,
        model_hash=ModelHash(model.path).get(),
        clip_skip=args.clip_skip or model.kind.default_clip_skip,
        vae_batch_size=vae_batch_size(args.vae_batch_size, args.batch_size),
        preview=preview_window() if args.interactive and not args.no_preview else None,
    )
    output.use_original_name = args.use_original_file_name
    sources = SourceImages(args.image_path, args.mask_path) if args.image_path is not None else None
    guides = GuideImages(args.guide_image_path) if args.guide_image_path is not None else None
    return Runner(gen, Defaults.from_args(args), output, args.batch_size, before_batch,
                  sources=sources, highres=highres_fix.from_args(args), guides=guides)


def vae_memory(args: argparse.Namespace, model: LoadedModel, gen: Generator) -> None:
    """`--vae_slices` (exact, in the Generator) or `--vae_tiling` (diffusers' blended tiles)."""
    gen.vae_slices = args.vae_slices
    if args.vae_tiling:
        model.vae.enable_tiling()


class ModelHash:
    """A1111's `Model hash` (SHA-256 of the file, 10 hex); folders have none.

    Computed in the background and remembered per file version (`library.models.hash_cache`).
    """

    def __init__(self, path: Path) -> None:
        from library.models.hash_cache import start_model_hash

        self._future: Future | None = start_model_hash(path) if path.is_file() else None

    def get(self) -> str | None:
        return self._future.result() if self._future is not None else None


def _start_hash(ckpt: str) -> None:
    """Start hashing the checkpoint file now, so it overlaps the load (`runner` collects it)."""
    from library.models.checkpoint import resolve_model_path

    try:
        ModelHash(resolve_model_path(ckpt))
    except UserError:
        pass  # load_model reports it


def preview_window():
    """A function showing images in an OpenCV window until a key is pressed, or None."""
    try:
        import cv2
        import numpy as np
    except ImportError:
        logger.warning("no preview: OpenCV is not installed (--no_preview hides this)")
        return None
    if os.name != "nt" and not os.environ.get("DISPLAY") and not os.environ.get("WAYLAND_DISPLAY"):
        logger.warning("no preview: no display (--no_preview hides this)")
        return None

    def show(pictures) -> None:
        try:
            for picture in pictures:
                cv2.imshow("gen_img", cv2.cvtColor(np.asarray(picture), cv2.COLOR_RGB2BGR))
                cv2.waitKey()
            cv2.destroyAllWindows()
        except cv2.error:
            logger.warning("no preview: this OpenCV has no GUI (pip install opencv-python, or --no_preview)")

    return show


@dataclass
class Networks:
    """The additional networks of a run, and the per-batch multiplier switch (`--am`)."""

    loaded: list
    defaults: tuple[float, ...]
    switchable: int = 0  # networks from this index on are not merged and follow --am
    _current: tuple[float, ...] | None = None

    def before_batch(self, batch) -> None:
        """Set multipliers for the batch's `--am` values; merged networks keep theirs."""
        wanted = batch[0].network_multipliers or self.defaults
        if not self.loaded or wanted == self._current:
            return
        if len(wanted) != len(self.loaded):
            raise UserError(f"--am has {len(wanted)} values but {len(self.loaded)} networks are loaded")
        for network, value in list(zip(self.loaded, wanted))[self.switchable:]:
            network.set_multiplier(value)  # pre-calculated weights are recomputed by the network
        self._current = tuple(wanted)


def networks(args: argparse.Namespace, model: LoadedModel) -> Networks:
    """Load `--network_module/--network_weights`, then merge, pre-calculate or attach them."""
    import importlib

    muls = tuple(args.network_mul or [1.0] * len(args.network_module))
    loaded = []
    for i, (module_name, weights) in enumerate(zip(args.network_module, args.network_weights)):
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise UserError(f"--network_module {module_name}: cannot import it ({exc})") from None
        kwargs = _network_args(args.network_args[i] if args.network_args else "")
        network = module.create_network_from_weights(
            muls[i], weights, model.vae, model.text_encoder, model.unet, for_inference=True, **kwargs
        )
        if args.network_show_meta:
            print(f"metadata of {weights}:")
            for key, value in sorted(getattr(network, "metadata", {}).items()):
                print(f"  {key}: {value}")
        loaded.append(network)
    merged = len(loaded) if args.network_merge else (args.network_merge_n_models or 0)
    for network in loaded[:merged]:
        network.merge_to()
    for network in loaded[merged:]:
        network.apply_to()
        if args.network_pre_calc:
            network.pre_calculation()
    result = Networks(loaded, muls, switchable=merged)
    result._current = muls
    return result


def _network_args(text: str) -> dict[str, str]:
    """`--network_args "k=v,k2=v2"` as a dict."""
    pairs = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f'--network_args "{text}": expected key=value items separated by commas')
        pairs[key.strip()] = value.strip()
    return pairs
