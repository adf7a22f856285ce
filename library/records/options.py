"""The parsed command line as frozen records, split by what they decide.

`from_namespace` is the one place that reads the argparse namespace; everything after it
(`build`, `prompts`, `highres_fix`, `runner`) receives these records. A prompt-line option
never writes back into them: it makes a new Job (`dataclasses.replace`). The raw namespace
survives only in `Options.namespace`, for the original's plugin signature
`get_prompter(args, pipe, networks)` of `--from_module` files.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from library.records.deep_shrink_settings import DeepShrink
    from library.records.gradual_latent_settings import GradualLatent
    from library.records.size_conditioning import SizeConditioning
    from library.records.variation_settings import VariationDefaults

DEFAULT_SIZE = 512  # --W / --H when not given (and no img2img source decides)
SDXL_DEFAULT_SIZE = 1024  # --W / --H of an SDXL model when not given


@dataclass(frozen=True)
class LoadOptions:
    """Which model to load, where and in which precision, and how its networks run."""

    ckpt: str | None
    vae: str | None
    v1: bool
    v2: bool
    v_parameterization: bool
    tokenizer_cache_dir: str | None
    device: str | None
    fp16: bool
    bf16: bool
    no_half_vae: bool
    noise_device: str
    xformers: bool
    channels_last: bool
    vae_slices: int | None
    vae_tiling: bool
    blocked_attention: bool = False  # --blocked_attention: library.models.attention's blocked CPU bf16 self-attention
    compile: bool = False  # --compile: torch.compile of the U-Net and VAE decoder
    sdxl: bool = False  # --sdxl: assert an SDXL model
    xformers_option: str = "--xformers"  # which of --xformers / --diffusers_xformers asked (for its warning)


@dataclass(frozen=True)
class TextOptions:
    """How prompts become text states."""

    clip_skip: int | None
    max_embeddings_multiples: int | None
    emb_normalize_mode: str
    textual_inversion_embeddings: tuple[str, ...]
    xti_embeddings: tuple[str, ...]


@dataclass(frozen=True)
class GenerationOptions:
    """Per-image defaults that prompt-line options override, and the sampler."""

    width: int
    height: int
    width_given: bool  # --W typed (img2img keeps the source's width otherwise)
    height_given: bool
    steps: int
    scale: float
    negative_scale: float | None
    images_per_prompt: int
    sampler: str
    ddim_eta: float
    strength: float
    batch_size: int
    vae_batch_size: float | None
    deep_shrink: DeepShrink | None = None  # `--ds_*` (prompt lines override it)
    gradual_latent: GradualLatent | None = None  # `--gradual_latent_*` (prompt lines override it)
    zero_steps_offset: bool = False  # --force_scheduler_zero_steps_offset (img2img start rule)
    zero_terminal_snr: bool = False  # --zero_terminal_snr (rescaled betas)
    noise_offset: tuple[float | None, tuple[float, float] | None] = (None, None)  # --noise_offset_prob/_range
    pyramid_noise: tuple[float | None, tuple[float, float] | None] = (None, None)  # --pyramid_noise_prob/_range
    sizes: SizeConditioning | None = None  # SDXL's --original_* / --crop_* (prompt lines override them)
    variation: VariationDefaults | None = None  # --subseed/--subseed_strength/--seed_resize_from_w/_h
    eta_noise_seed_delta: int = 0  # --eta_noise_seed_delta (ENSD)


@dataclass(frozen=True)
class SourceOptions:
    """img2img / inpainting inputs."""

    image_path: str | None
    mask_path: str | None
    attention_couple: bool = False  # `--mask_path` is the region mask even without networks
    inpaint_with_networks: bool = False  # `--mask_path` is the inpainting mask even with networks


@dataclass(frozen=True)
class HighresOptions:
    """Highres fix (`scale` None: off)."""

    scale: float | None
    steps: int
    strength: float | None
    save_1st: bool
    latents_upscaling: str | None
    upscaler: str | None
    upscaler_args: str | None
    disable_control_net: bool


@dataclass(frozen=True)
class ControlNetOptions:
    """ControlNet models and guide images (`models` empty: off)."""

    models: tuple[str, ...]
    guide_image_path: tuple[str, ...] | None  # shared with CLIP image / VGG16 guidance
    preps: tuple[str, ...] | None
    weights: tuple[float, ...] | None
    ratios: tuple[float, ...] | None


@dataclass(frozen=True)
class GuidanceOptions:
    """CLIP text / CLIP image / VGG16 guidance (scales 0: off) and their local models."""

    clip_scale: float
    clip_image_scale: float
    vgg16_scale: float
    vgg16_layer: int
    clip_model: str | None
    vgg16_weights: str | None


@dataclass(frozen=True)
class NetworkOptions:
    """Additional networks (LoRA): one module, weight file, multiplier and args each."""

    modules: tuple[str, ...]
    weights: tuple[str, ...]
    multipliers: tuple[float, ...]
    args: tuple[str, ...]
    show_meta: bool
    merge: bool
    merge_n_models: int | None
    pre_calc: bool
    regional_color_codes: int | None = None  # `--network_regional_mask_max_color_codes`


@dataclass(frozen=True)
class DialectOptions:
    """The web UI's prompt dialect: where `<lora:...>` / `<hypernet:...>` tags find their files,
    run-wide hypernetworks, and the styles file (`library.prompts.extra_networks`, `library.prompts.styles`)."""

    lora_dirs: tuple[str, ...] = ()
    hypernetwork_dirs: tuple[str, ...] = ()
    hypernetworks: tuple[str, ...] = ()  # `--hypernetwork FILE ...`
    hypernetwork_muls: tuple[float, ...] = ()  # `--hypernetwork_mul M ...` (default 1 each)
    styles: str | None = None  # `--styles FILE` (a web UI styles.csv)


@dataclass(frozen=True)
class OutputOptions:
    """Where and how images are written."""

    outdir: str
    sequential_file_name: bool
    use_original_file_name: bool
    preview: bool  # interactive mode shows images (not --no_preview)
    skip_existing: bool = False  # resume: images whose files are there are not made again
    run_record: str | None = None  # the run's pixel-deciding options as JSON (`library.cli.regenerate`)


@dataclass(frozen=True)
class RoundOptions:
    """Where prompts come from and how often they are run."""

    prompt: str | None
    from_file: str | None
    from_module: str | None
    interactive: bool
    seed: int | None
    n_iter: int
    iter_same_seed: bool
    shuffle_prompts: bool
    sweep: tuple[str, ...] = ()  # `--xyz` axes (`library.prompts.sweeps`)
    prompt_matrix: bool = False  # `--prompt_matrix`
    png_lines: tuple[tuple[str, str], ...] = ()  # `--from_png`: (prompt line, file) per image (cli.regenerate)


@dataclass(frozen=True)
class Options:
    """Everything the command line decides."""

    load: LoadOptions
    text: TextOptions
    generation: GenerationOptions
    sources: SourceOptions
    highres: HighresOptions
    controlnet: ControlNetOptions
    guidance: GuidanceOptions
    networks: NetworkOptions
    output: OutputOptions
    rounds: RoundOptions
    namespace: argparse.Namespace  # only for `--from_module` prompters (the original's signature)
    dialect: DialectOptions = DialectOptions()  # the web UI's prompt dialect (tags, hypernetworks, styles)


def vae_batch_size(value: float | None, batch_size: int) -> int:
    """`--vae_batch_size` as a count: a value below 1 is a fraction of the batch size."""
    if value is None:
        return batch_size
    if value < 1:
        return max(1, int(batch_size * value))
    return int(value)


def regional_lora(options: Options) -> bool:
    """Networks and `--mask_path` together: the mask gives the networks' regions (the original's rule),
    unless `--inpaint_with_networks` makes it the inpainting mask."""
    s = options.sources
    return bool(options.networks.modules) and s.mask_path is not None and not s.inpaint_with_networks


def has_region_mask(options: Options) -> bool:
    """`--mask_path` is a region mask (not an inpainting mask): with networks or `--attention_couple`."""
    return options.sources.mask_path is not None and (regional_lora(options) or options.sources.attention_couple)


def deep_shrink_of(a: argparse.Namespace) -> DeepShrink | None:
    """`--ds_depth_1 ... --ds_ratio` as settings (None without `--ds_depth_1`)."""
    from library.records.deep_shrink_settings import from_values

    return from_values(a.ds_depth_1, a.ds_timesteps_1, a.ds_depth_2, a.ds_timesteps_2, a.ds_ratio)


def gradual_latent_of(a: argparse.Namespace) -> GradualLatent | None:
    """`--gradual_latent_*` as settings (None without `--gradual_latent_timesteps`)."""
    from library.records.gradual_latent_settings import GradualLatent, parse_unsharp

    if a.gradual_latent_timesteps is None:
        return None
    return GradualLatent(a.gradual_latent_timesteps, a.gradual_latent_ratio, a.gradual_latent_ratio_step,
                         a.gradual_latent_every_n_steps, a.gradual_latent_s_noise,
                         parse_unsharp(a.gradual_latent_unsharp_params))


def sizes_of(a: argparse.Namespace) -> SizeConditioning:
    """`--original_height ... --crop_left` as SDXL size settings (None where not given)."""
    from library.records.size_conditioning import SizeConditioning

    return SizeConditioning(a.original_height, a.original_width, a.original_height_negative,
                            a.original_width_negative, a.crop_top, a.crop_left)


def for_model(options: Options, family: str) -> Options:
    """The options for a model of `family` ("sd1", "sd2", "sdxl"), known once it is read: SDXL
    generates 1024 x 1024 when `--W/--H` are not given; an SD 1.x/2.x model has no size
    conditioning, so `--original_*` / `--crop_*` are refused for it."""
    from dataclasses import replace

    from library.errors import UserError

    g = options.generation
    if family != "sdxl":
        if g.sizes is not None and g.sizes.given:
            name = next(n for n in ("original_height", "original_width", "original_height_negative",
                                    "original_width_negative", "crop_top", "crop_left")
                        if getattr(g.sizes, n) is not None)
            raise UserError(f"--{name}: SDXL only; this model is SD 1.x/2.x, which has no size conditioning")
        return options
    width = g.width if g.width_given else SDXL_DEFAULT_SIZE
    height = g.height if g.height_given else SDXL_DEFAULT_SIZE
    return replace(options, generation=replace(g, width=width, height=height))
def variation_of(a: argparse.Namespace) -> VariationDefaults:
    """`--subseed`, `--subseed_strength`, `--seed_resize_from_w/_h` as defaults of the prompt lines."""
    from library.records.variation_settings import VariationDefaults

    return VariationDefaults(a.subseed, a.subseed_strength or 0.0, a.seed_resize_from_w, a.seed_resize_from_h)


def _tuple(values) -> tuple:
    return tuple(values or ())


def from_namespace(a: argparse.Namespace) -> Options:
    """The records of a parsed (and validated) namespace."""
    return Options(
        load=LoadOptions(a.ckpt, a.vae, a.v1, a.v2, a.v_parameterization, a.tokenizer_cache_dir, a.device,
                         a.fp16, a.bf16, a.no_half_vae, a.noise_device, a.xformers or a.diffusers_xformers,
                         a.opt_channels_last, a.vae_slices, a.vae_tiling, a.blocked_attention, a.compile,
                         a.sdxl, xformers_option="--xformers" if a.xformers else "--diffusers_xformers"),
        text=TextOptions(a.clip_skip, a.max_embeddings_multiples, a.emb_normalize_mode,
                         _tuple(a.textual_inversion_embeddings), _tuple(a.XTI_embeddings)),
        generation=GenerationOptions(a.W or DEFAULT_SIZE, a.H or DEFAULT_SIZE, a.W is not None, a.H is not None,
                                     a.steps, a.scale, a.negative_scale, a.images_per_prompt, a.sampler,
                                     a.ddim_eta, a.strength, a.batch_size, a.vae_batch_size,
                                     deep_shrink=deep_shrink_of(a), gradual_latent=gradual_latent_of(a),
                                     zero_steps_offset=a.force_scheduler_zero_steps_offset,
                                     zero_terminal_snr=a.zero_terminal_snr,
                                     noise_offset=(a.noise_offset_prob,
                                                   a.noise_offset_range and tuple(a.noise_offset_range)),
                                     pyramid_noise=(a.pyramid_noise_prob, a.pyramid_noise_discount_range
                                                    and tuple(a.pyramid_noise_discount_range)),
                                     sizes=sizes_of(a),
                                     variation=variation_of(a), eta_noise_seed_delta=a.eta_noise_seed_delta or 0),
        sources=SourceOptions(a.image_path, a.mask_path, a.attention_couple, a.inpaint_with_networks),
        highres=HighresOptions(a.highres_fix_scale, a.highres_fix_steps, a.highres_fix_strength,
                               a.highres_fix_save_1st, a.highres_fix_latents_upscaling, a.highres_fix_upscaler,
                               a.highres_fix_upscaler_args, a.highres_fix_disable_control_net),
        controlnet=ControlNetOptions(_tuple(a.control_net_models), a.guide_image_path and tuple(a.guide_image_path),
                                     a.control_net_preps and tuple(a.control_net_preps),
                                     a.control_net_weights and tuple(a.control_net_weights),
                                     a.control_net_ratios and tuple(a.control_net_ratios)),
        guidance=GuidanceOptions(a.clip_guidance_scale, a.clip_image_guidance_scale, a.vgg16_guidance_scale,
                                 a.vgg16_guidance_layer, a.clip_model, a.vgg16_weights),
        networks=NetworkOptions(_tuple(a.network_module), _tuple(a.network_weights), _tuple(a.network_mul),
                                _tuple(a.network_args), a.network_show_meta, a.network_merge,
                                a.network_merge_n_models, a.network_pre_calc,
                                a.network_regional_mask_max_color_codes),
        output=OutputOptions(a.outdir, a.sequential_file_name, a.use_original_file_name,
                             a.interactive and not a.no_preview, a.skip_existing,
                             getattr(a, "run_record", None)),
        rounds=RoundOptions(a.prompt, a.from_file, a.from_module, a.interactive, a.seed, a.n_iter,
                            a.iter_same_seed, a.shuffle_prompts, tuple(a.xyz or ()), a.prompt_matrix,
                            tuple(getattr(a, "png_lines", ()))),
        namespace=a,
        dialect=DialectOptions(_tuple(getattr(a, "lora_dir", ())), _tuple(getattr(a, "hypernetwork_dir", ())),
                               _tuple(getattr(a, "hypernetwork", ())), _tuple(getattr(a, "hypernetwork_mul", ())),
                               getattr(a, "styles", None)),
    )
