"""Checks of the parsed command line that need no file and no model.

`validate` runs right after argparse, so a mistake is reported in the time it takes to parse
the arguments: exclusive options, counts and ranges per option group, sampler names,
non-finite numbers, seeds, image sizes and steps per sampler (the limits themselves are
`library.records.limits`, which the prompt lines are checked against too), an empty
`--outdir`. Checks of files (they exist, they decode) are `library.cli.preflight`.
"""

from __future__ import annotations

import argparse

from library.cli.webui_options import validate_webui
from library.errors import UserError
from library.records import limits

#: The original's SDXL-only options not supported yet (name, nargs, type): accepted by the parser,
#: then refused in one line.
SDXL_ONLY_OPTIONS: tuple[tuple[str, object, object], ...] = (
    ("clip_vision_strength", None, float), ("control_net_lllite_models", "*", str),
)

#: SDXL's size conditioning (`library.records.size_conditioning`): option name, help.
SDXL_SIZE_OPTIONS: tuple[tuple[str, str], ...] = (
    ("original_height", "original height the image is conditioned on (default: the height generated)"),
    ("original_width", "original width the image is conditioned on (default: the width generated)"),
    ("original_height_negative", "original height of the negative prompt's conditioning "
     "(default: --original_height)"),
    ("original_width_negative", "original width of the negative prompt's conditioning "
     "(default: --original_width)"),
    ("crop_top", "top of the crop the image is conditioned on (default 0)"),
    ("crop_left", "left of the crop the image is conditioned on (default 0)"),
)

def check_options(args: argparse.Namespace) -> None:
    """Ranges the rest of `validate` does not check; raises `UserError` with one line."""
    if args.seed is not None:
        limits.check_seed(args.seed)
    for name in ("W", "H"):
        if getattr(args, name) is not None:  # None: 512, or the img2img source's size
            limits.check_side(getattr(args, name), f"--{name}")
    limits.check_steps(args.steps, args.sampler)
    limits.check_batch_size(args.batch_size)
    if getattr(args, "highres_fix_scale", None) is not None:
        limits.check_steps(args.highres_fix_steps, args.sampler, "--highres_fix_steps")
    if not str(args.outdir).strip():
        raise UserError("--outdir is empty: give the folder for the images (default: outputs)")


def validate(args: argparse.Namespace) -> None:
    """Check what argparse cannot: ranges, exclusive options, sampler names."""
    from library.records.webui_samplers import canonical_sampler

    # first, so that every float option (and every one added later) refuses nan/inf with this one line
    limits.check_finite((f"--{name}", value) for name, value in vars(args).items())
    args.sampler = canonical_sampler(args.sampler)  # the web UI's names ("DPM++ 2M Karras") become ours
    sources = [o for o in ("prompt", "from_file", "from_module", "interactive", "from_png") if getattr(args, o)]
    if len(sources) > 1:
        raise UserError(f"give one prompt source, not {' and '.join('--' + s for s in sources)}")
    if not sources and args.image_path is None:
        raise UserError("no prompt: give --prompt, --from_file, --from_module or --interactive "
                        "(or --image_path with images that have prompts in their metadata, or --from_png)")
    if args.fp16 and args.bf16:
        raise UserError("--fp16 and --bf16 exclude each other")
    kinds = [f"--{name}" for name in ("v1", "v2", "sdxl") if getattr(args, name)]
    if len(kinds) > 1:
        raise UserError(f"{' and '.join(kinds)} exclude each other")
    validate_sdxl_sizes(args)
    validate_original_compat(args)
    validate_prompt_dialect(args)
    validate_img2img(args)
    validate_controlnet(args)
    validate_guidance(args)
    for name in ("W", "H"):
        value = getattr(args, name)
        if value is not None and (value < 8 or value % 8):
            raise UserError(f"--{name} {value}: must be a positive multiple of 8")
    for name in ("steps", "images_per_prompt", "n_iter", "batch_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} {getattr(args, name)}: must be at least 1")
    if args.vae_batch_size is not None and args.vae_batch_size <= 0:
        raise UserError(f"--vae_batch_size {args.vae_batch_size}: must be positive")
    if args.clip_skip is not None and args.clip_skip < 1:
        raise UserError(f"--clip_skip {args.clip_skip}: must be at least 1")
    if args.max_embeddings_multiples is not None and args.max_embeddings_multiples < 1:
        raise UserError(f"--max_embeddings_multiples {args.max_embeddings_multiples}: must be at least 1")
    n = len(args.network_module)
    if len(args.network_weights) != n:
        raise UserError(f"--network_weights has {len(args.network_weights)} values but --network_module has {n}")
    if args.network_mul and len(args.network_mul) > n:
        raise UserError(f"--network_mul has {len(args.network_mul)} values but --network_module has {n}; "
                        "give at most one per network")
    if args.network_args and len(args.network_args) != n:
        raise UserError(f"--network_args has {len(args.network_args)} values but --network_module has {n}")
    if args.network_merge and args.network_pre_calc:
        raise UserError("--network_merge and --network_pre_calc exclude each other")
    check_options(args)  # finite numbers, seeds, size and steps limits
    validate_webui(args)  # variation seeds, seed resize, ENSD, sweeps
    validate_high_resolution(args)  # last: it imports torch


def validate_original_compat(args: argparse.Namespace) -> None:
    """The original's options beyond the manual: SDXL-only ones refused, noise options complete,
    `--zero_terminal_snr` with a sampler that has it."""
    from library.sampling.schedulers import make_scheduler

    for name, _nargs, _type in SDXL_ONLY_OPTIONS:
        value = getattr(args, name)
        if value is not None and value is not False:  # given at all: 0 and 0.0 too (0 == False)
            raise UserError(f"--{name}: not supported yet (SDXL's CLIP Vision and ControlNet-LLLite); leave it out")
    for prob, rng in (("noise_offset_prob", "noise_offset_range"),
                      ("pyramid_noise_prob", "pyramid_noise_discount_range")):
        value = getattr(args, prob)
        if value is not None and not 0 <= value <= 1:
            raise UserError(f"--{prob} {value}: must be between 0 and 1")
        if value and getattr(args, rng) is None:
            raise UserError(f"--{prob} needs --{rng} MIN MAX")
        bounds = getattr(args, rng)
        if bounds is not None and bounds[0] > bounds[1]:
            raise UserError(f"--{rng} {bounds[0]:g} {bounds[1]:g}: MIN must not be above MAX")
    if args.zero_terminal_snr:
        make_scheduler(args.sampler, False, zero_terminal_snr=True)


def validate_sdxl_sizes(args: argparse.Namespace) -> None:
    """SDXL's size conditioning: original sizes at least 1, crops at least 0 (an SD 1.x/2.x model
    refuses them once its kind is known: `library.records.options.for_model`)."""
    for name, _help in SDXL_SIZE_OPTIONS:
        value = getattr(args, name)
        least = 0 if name.startswith("crop") else 1
        if value is not None and value < least:
            raise UserError(f"--{name} {value}: must be at least {least}")
        if value is not None and value > limits.MAX_CONDITIONING_SIZE:
            raise UserError(f"--{name} {value}: must be at most {limits.MAX_CONDITIONING_SIZE}")


def validate_img2img(args: argparse.Namespace) -> None:
    """The img2img / Highres fix / VAE memory options: ranges and combinations."""
    for name in ("strength", "highres_fix_strength"):
        value = getattr(args, name)
        if value is not None and not 0 <= value <= 1:
            raise UserError(f"--{name} {value}: must be between 0 and 1")
    if args.inpaint_with_networks:
        if args.attention_couple:
            raise UserError("--inpaint_with_networks and --attention_couple exclude each other (an inpainting mask "
                            "or a region mask)")
        if not (args.network_module and args.mask_path and args.image_path):
            raise UserError("--inpaint_with_networks needs --network_module, --image_path and --mask_path (the "
                            "inpainting mask)")
    regions = args.mask_path is not None and not args.inpaint_with_networks and (
        args.network_module or args.attention_couple)
    if args.image_path is None:
        if args.use_original_file_name:
            raise UserError("--use_original_file_name needs --image_path (the images to work on)")
        if args.mask_path and not regions:
            raise UserError("--mask_path needs --image_path (the images to inpaint), or --attention_couple to read it "
                            "as the region mask of the prompt's ' AND ' parts")
    if args.attention_couple and args.mask_path is None:
        raise UserError("--attention_couple needs --mask_path (the region mask); without a mask the ' AND ' parts "
                        "share the whole image")
    codes = args.network_regional_mask_max_color_codes
    if codes is not None and not 1 <= codes <= 7:
        raise UserError(f"--network_regional_mask_max_color_codes {codes}: must be 1 to 7 (the colour codes red, "
                        "green, yellow, blue, magenta, cyan, white)")
    if args.highres_fix_scale is not None:
        if not 0 < args.highres_fix_scale <= 1:
            raise UserError(f"--highres_fix_scale {args.highres_fix_scale}: must be above 0 and at most 1 "
                            "(the 1st stage's size as a fraction of --W/--H)")
        if args.highres_fix_steps < 1:
            raise UserError(f"--highres_fix_steps {args.highres_fix_steps}: must be at least 1")
        if args.highres_fix_latents_upscaling and args.highres_fix_upscaler:
            raise UserError("--highres_fix_latents_upscaling and --highres_fix_upscaler exclude each other")
    else:
        for name in ("highres_fix_strength", "highres_fix_save_1st", "highres_fix_latents_upscaling",
                     "highres_fix_upscaler"):
            if getattr(args, name):
                raise UserError(f"--{name} needs --highres_fix_scale")
    if args.highres_fix_upscaler_args and not args.highres_fix_upscaler:
        raise UserError("--highres_fix_upscaler_args needs --highres_fix_upscaler")
    if args.vae_slices is not None and args.vae_slices < 1:
        raise UserError(f"--vae_slices {args.vae_slices}: must be at least 1")
    if args.vae_slices and args.vae_tiling:
        raise UserError("--vae_slices and --vae_tiling exclude each other; --vae_slices keeps the image exact")


def validate_controlnet(args: argparse.Namespace) -> None:
    """ControlNet options: a guide for the models, models for the guide, counts and ranges."""
    models = args.control_net_models or []
    if models and args.guide_image_path is None:
        raise UserError("--control_net_models needs --guide_image_path (the hint image or folder)")
    if not models:
        if args.guide_image_path is not None and not (args.clip_image_guidance_scale or args.vgg16_guidance_scale):
            raise UserError("--guide_image_path needs --control_net_models, --clip_image_guidance_scale or "
                            "--vgg16_guidance_scale")
        for name in ("control_net_preps", "control_net_weights", "control_net_ratios"):
            if getattr(args, name) is not None:
                raise UserError(f"--{name} needs --control_net_models")
        return  # --highres_fix_disable_control_net alone is harmless: accepted, as in the original
    for name in ("control_net_preps", "control_net_weights", "control_net_ratios"):
        values = getattr(args, name) or []
        if len(values) > len(models):
            raise UserError(f"--{name} has {len(values)} values but --control_net_models has {len(models)}; "
                            "give at most one per model (missing ones take the defaults)")
    for ratio in args.control_net_ratios or []:
        if not 0 <= ratio <= 1:
            raise UserError(f"--control_net_ratios {ratio}: must be between 0 and 1")
    if args.control_net_preps:  # refused before any model loads, with the loader's line
        from library.features.controlnet import parse_prep  # imports torch: only with ControlNet options

        for prep in args.control_net_preps:
            parse_prep(prep)


def validate_guidance(args: argparse.Namespace) -> None:
    """Guidance: a guide image for image / VGG guidance, the VGG16 layer's range."""
    for name in ("clip_image_guidance_scale", "vgg16_guidance_scale"):
        if getattr(args, name) and args.guide_image_path is None:
            raise UserError(f"--{name} needs --guide_image_path (the image or folder to guide towards)")
    if not 0 <= args.vgg16_guidance_layer <= 30:
        raise UserError(f"--vgg16_guidance_layer {args.vgg16_guidance_layer}: must be 0..30 (VGG16's features)")


def validate_high_resolution(args: argparse.Namespace) -> None:
    """Deep Shrink / Gradual Latent: ranges (another sampler than euler_a: `library.cli.compat`)."""
    from library.records.deep_shrink_settings import check_ratio
    from library.records.gradual_latent_settings import parse_unsharp

    for name in ("ds_depth_1", "ds_depth_2"):
        value = getattr(args, name)
        if value is not None and value < 0:
            raise UserError(f"--{name} {value}: must be 0 to 3 (the down block of SD 1.x/2.x; SDXL: 0 to 8)")
    if args.ds_depth_1 is None and args.ds_depth_2 is not None:
        raise UserError("--ds_depth_2 needs --ds_depth_1")
    check_ratio(args.ds_ratio, "--ds_ratio")
    parse_unsharp(args.gradual_latent_unsharp_params)
    if args.gradual_latent_timesteps is None:
        return
    if not 0 < args.gradual_latent_ratio <= 1:
        raise UserError(f"--gradual_latent_ratio {args.gradual_latent_ratio}: must be above 0 and at most 1")
    if not args.gradual_latent_ratio_step > 0:
        raise UserError(f"--gradual_latent_ratio_step {args.gradual_latent_ratio_step}: must be above 0")
    if args.gradual_latent_every_n_steps < 1:
        raise UserError(f"--gradual_latent_every_n_steps {args.gradual_latent_every_n_steps}: must be at least 1")


def validate_prompt_dialect(args: argparse.Namespace) -> None:
    """`--hypernetwork_mul`: one value per `--hypernetwork` file."""
    files, muls = getattr(args, "hypernetwork", []), getattr(args, "hypernetwork_mul", [])
    if muls and not files:
        raise UserError("--hypernetwork_mul given without --hypernetwork")
    if muls and len(muls) != len(files):
        raise UserError(f"--hypernetwork_mul has {len(muls)} values but --hypernetwork has {len(files)}")
