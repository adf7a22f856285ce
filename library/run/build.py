"""Turning the option records into the objects of a run: device, dtypes, model, pipeline, runner.

Each function takes the records it needs (`library.records.options`) and returns one ready object, so
`gen_img.py` reads as the list of steps of a run.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import torch

from library.errors import UserError, first_line
from library.features import FEATURES, load_networks
from library.images import output_files
from library.images.input_images import GuideImages
from library.images.run_metadata import run_parameters
from library.models import LoadedModel, load_model
from library.prompts.sources import Defaults
from library.records.options import LoadOptions, Options, TextOptions, vae_batch_size
from library.run.distributed import SOLO, Team
from library.run.runner import OutputSettings, Runner
from library.sampling import highres_fix
from library.sampling.img2img import SourceImages
from library.sampling.patches import RunSetup
from library.sampling.pipeline import Pipeline
from library.text.encoder import PromptEncoder
from library.text.sdxl_encoder import DualPromptEncoder

logger = logging.getLogger(__name__)

DEMO_DIR = Path(__file__).resolve().parents[2] / "models"  # the repository's models/ (git ignores it)
DEMO_LINE = ("no --ckpt given: using the demo model {path}{written} (tiny, random weights: the images are noise; "
             "give your model with --ckpt)")
#: `--skip_existing` with random seeds: default file names hold the seed, which a new run draws anew.
SKIP_EXISTING_WITHOUT_SEED = (
    "--skip_existing without --seed: the seeds are drawn anew, so the default file names (which hold "
    "the seed) cannot match the earlier run's files; give the earlier run's --seed (or --sequential_file_name)")


FP16_ON_CPU = ("--fp16 on the CPU: most CPUs have no fast float16 kernels (a 256x256 SD 1.5 step took 100 s "
               "on a 2-core AMD EPYC, 0.7 s with --bf16); use --bf16 for half precision on the CPU")


@dataclass(frozen=True)
class Runtime:
    """Where and in which precision the networks run."""

    device: torch.device
    dtype: torch.dtype
    vae_dtype: torch.dtype
    noise_device: torch.device

    @classmethod
    def from_options(cls, options: LoadOptions, local_rank: int = 0) -> Runtime:
        name = device_name(options.device, torch.cuda.is_available(), local_rank)
        try:
            device = torch.device(name)
            if device.type == "cuda" and device.index is not None:
                torch.cuda.set_device(device)  # libraries that use "the current GPU" use this one
            torch.empty(1, device=device)
        except (RuntimeError, AssertionError) as exc:
            raise UserError(f"--device {name}: not usable here ({first_line(exc, 120)})") from None
        dtype = torch.float16 if options.fp16 else torch.bfloat16 if options.bf16 else torch.float32
        if dtype == torch.float16 and device.type == "cpu":
            logger.warning(FP16_ON_CPU)
        vae_dtype = torch.float32 if options.no_half_vae else dtype
        noise_device = torch.device("cpu") if options.noise_device == "cpu" else device
        return cls(device, dtype, vae_dtype, noise_device)


def device_name(given: str | None, cuda: bool, local_rank: int = 0) -> str:
    """`--device` (default: the GPU if there is one); a process of a split run
    (`library.run.distributed`) takes `cuda:<local_rank>` for `cuda` without an index."""
    name = given or ("cuda" if cuda else "cpu")
    return f"cuda:{local_rank}" if name == "cuda" and local_rank else name


def checkpoint_path(options: LoadOptions) -> str:
    """`--ckpt`, or the demo model (written on first use, announced in one line) when none is given."""
    if options.ckpt:
        return options.ckpt
    from library.models.tiny_files import make_demo_model

    path, written = make_demo_model(DEMO_DIR)
    size = f", written now ({path.stat().st_size / 1e6:.0f} MB)" if written else ""
    logger.warning(DEMO_LINE.format(path=path, written=size))
    return str(path)


def load(options: LoadOptions, runtime: Runtime) -> LoadedModel:
    """The model of `--ckpt` (and `--vae`), on the run's device and dtypes, with its attention
    backend and memory layout set (SDPA by default, xformers on request). A single file's VAE
    encoder is read from the file on first use (`library.models.lazy_encoder`)."""
    ckpt = checkpoint_path(options)
    _start_hash(ckpt)
    model = load_model(
        ckpt,
        vae=options.vae,
        dtype=runtime.dtype,
        vae_dtype=runtime.vae_dtype,
        device=runtime.device,
        v1=options.v1,
        v2=options.v2,
        sdxl=options.sdxl,  # --sdxl asserts an SDXL model
        v_parameterization=options.v_parameterization,
        tokenizer_cache_dir=options.tokenizer_cache_dir,
        # PyTorch SDPA unless asked: blocked attention is faster single-threaded, slower with 2 threads
        attention="auto" if options.blocked_attention else "sdpa",
        vae_encoder="lazy",  # loaded when something encodes (img2img, Highres fix); txt2img never does
    )
    if options.xformers and xformers_usable(options.xformers_option):
        model.unet.enable_xformers_memory_efficient_attention()
        model.vae.enable_xformers_memory_efficient_attention()
    if options.channels_last:
        model.unet.to(memory_format=torch.channels_last)
    if options.vae_tiling:
        model.vae.enable_tiling()
    if options.compile:
        from library.models.compiling import compile_networks

        compile_networks(model.unet, model.vae, next(model.unet.parameters()).device)
    return model


def for_model(options: Options, model: LoadedModel) -> Options:
    """The options for the loaded model's kind (`library.records.options.for_model`)."""
    from library.records.options import for_model as adjusted

    return adjusted(options, model.kind.family)


def xformers_usable(option: str = "--xformers") -> bool:
    """`--xformers` / `--diffusers_xformers` (`option`, the one given): True when xformers can be
    imported; otherwise a warning naming that option, and the run goes on with PyTorch SDPA (every
    example of the manual passes --xformers)."""
    try:
        import xformers  # noqa: F401
    except ImportError:
        logger.warning("%s: xformers is not installed; using PyTorch SDPA attention instead "
                       "(the same speed on CPU; pip install xformers to use it on a GPU)", option)
        return False
    return True


def networks(options: Options, model: LoadedModel):
    """`--network_module/--network_weights` loaded, merged, pre-calculated or prepared: the run's
    networks, which the pipeline's features take from its setup."""
    from library.records.options import regional_lora

    return load_networks(options.networks, model, regional=regional_lora(options))


def pipeline(options: Options, model: LoadedModel, runtime: Runtime, nets=None) -> Pipeline:
    """The pipeline for this model, with the run's sampler, prompt encoder and the features it uses
    (`library.features.FEATURES`, each built by its `from_run`, in that order)."""
    encoder = prompt_encoder(options.text, model)
    setup = RunSetup(options, model, runtime.device, runtime.dtype, runtime.vae_dtype, encoder, nets)
    features = [f for f in (cls.from_run(setup) for cls in FEATURES) if f is not None]
    warn_unused_eta(options.generation.sampler, options.generation.ddim_eta)
    return Pipeline(
        unet=model.unet,
        vae=model.vae,
        encoder=encoder,
        sampler=options.generation.sampler,
        v_prediction=model.kind.v_prediction,
        device=runtime.device,
        dtype=runtime.dtype,
        noise_device=runtime.noise_device,
        ddim_eta=options.generation.ddim_eta,
        vae_slices=options.load.vae_slices,
        zero_steps_offset=options.generation.zero_steps_offset,
        zero_terminal_snr=options.generation.zero_terminal_snr,
        start_noise=start_noise(options),
        eta_noise_seed_delta=options.generation.eta_noise_seed_delta,
        features=features,
    )


def warn_unused_eta(sampler: str, eta: float) -> None:
    """`--ddim_eta` with a sampler whose step has no eta: a warning instead of a silent no-op."""
    import inspect

    from library.sampling.schedulers import make_scheduler

    if eta and "eta" not in inspect.signature(make_scheduler(sampler, False).step).parameters:
        logger.warning("--ddim_eta %g ignored: --sampler %s has no eta (ddim has)", eta, sampler)


def start_noise(options: Options):
    """`--noise_offset_prob` / `--pyramid_noise_prob` as a start-noise change, or None when off."""
    from library.sampling.start_noise import StartNoise

    g = options.generation
    change = StartNoise(g.noise_offset[0], g.noise_offset[1], g.pyramid_noise[0], g.pyramid_noise[1])
    return change if change.active else None


def prompt_encoder(options: TextOptions, model: LoadedModel) -> PromptEncoder | DualPromptEncoder:
    """The prompt encoder with `--clip_skip`, the token limit and the run's embeddings (SDXL: one
    per text encoder, joined by `library.text.sdxl_encoder.DualPromptEncoder`)."""
    from library.text.embeddings import load_embeddings

    embeddings = load_embeddings(list(options.textual_inversion_embeddings), list(options.xti_embeddings),
                                 model.text_encoder, model.unet, text_encoder_2=model.text_encoder_2)
    common = dict(clip_skip=options.clip_skip or model.kind.default_clip_skip,
                  max_embeddings_multiples=options.max_embeddings_multiples or 1,
                  normalize_mode=options.emb_normalize_mode)
    if model.text_encoder_2 is None:
        return PromptEncoder(model.tokenizer, model.text_encoder, embeddings=embeddings, **common)
    second = None if embeddings is None else embeddings.for_encoder(1)  # the same words, clip_g's vectors
    return DualPromptEncoder(
        PromptEncoder(model.tokenizer, model.text_encoder, embeddings=embeddings, final_layer_norm=False, **common),
        PromptEncoder(model.tokenizer_2, model.text_encoder_2, embeddings=second, final_layer_norm=False,
                      pooled=True, **common),
    )


def runner(options: Options, model: LoadedModel, pipeline: Pipeline, team: Team = SOLO) -> Runner:
    """A Runner writing into `--outdir` with this run's metadata (this process's share of it)."""
    from library.records.options import has_region_mask
    from library.run import interactive
    from library.run.preview import preview_window

    outdir = Path(options.output.outdir)
    try:
        outdir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--outdir {outdir}: cannot create it ({exc.strerror})") from None
    g = options.generation
    output = OutputSettings(
        outdir=outdir,
        sampler=g.sampler,
        sequential=options.output.sequential_file_name,
        model_name=model.name,
        model_hash=ModelHash(model.path).get(),
        clip_skip=options.text.clip_skip or model.kind.default_clip_skip,
        vae_batch_size=vae_batch_size(g.vae_batch_size, g.batch_size),
        preview=preview_window() if options.output.preview and team.leads else None,
        announce=interactive.announce if options.rounds.interactive else None,
        use_original_name=options.output.use_original_file_name,
        run_metadata=run_parameters(
            vae=options.load.vae, sampler=g.sampler, ddim_eta=g.ddim_eta, lora_files=options.networks.weights,
            embedding_files=(*options.text.textual_inversion_embeddings, *options.text.xti_embeddings)),
        lora_files=tuple(options.networks.weights),
        lora_multipliers=tuple(options.networks.multipliers or [1.0] * len(options.networks.weights)),
        timestamp=team.timestamp or output_files.timestamp_now(),
        skip_existing=options.output.skip_existing,
        run_text=(("run-options", options.output.run_record),) if options.output.run_record else (),
    )
    if output.skip_existing and options.rounds.seed is None and not output.sequential:
        logger.warning(SKIP_EXISTING_WITHOUT_SEED)
    s = options.sources
    inpainting_masks = None if has_region_mask(options) else s.mask_path
    resized = g.width_given and g.height_given  # --W and --H: sources and masks resized to them
    sources = SourceImages(s.image_path, inpainting_masks, resized) if s.image_path is not None else None
    if options.highres.strength is not None and sources is None:
        logger.warning("--highres_fix_strength is the strength of an img2img 1st stage (with --image_path); "
                       "ignored here: the 2nd stage takes --strength, as in the original")
    guide_path = options.controlnet.guide_image_path
    per_image = max(1, len(options.controlnet.models or ()))  # ControlNet k gets guide k of an image's group
    guides = GuideImages(guide_path, per_image) if guide_path is not None else None
    defaults = Defaults.from_options(options, sdxl=model.kind.family == "sdxl")
    return Runner(pipeline, defaults, output, g.batch_size,
                  sources=sources, highres=highres_fix.from_options(options.highres), guides=guides, team=team)


class ModelHash:
    """A1111's `Model hash` (SHA-256 of the file, 10 hex); folders have none.

    Computed in the background and remembered per file version (`library.images.hashes`).
    """

    def __init__(self, path: Path) -> None:
        from library.images.hashes import start_model_hash

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

