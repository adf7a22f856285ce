"""The command line: options grouped like the manual, same names and defaults.

`parse_args` returns the argparse namespace after validation; mistakes end with one line
and exit status 2 (argparse's usage block is not printed, `--help` shows everything).
"""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn, Sequence

from library.errors import UserError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    """The full parser; every group corresponds to a section of the manual."""
    from library.samplers import sampler_names

    p = _Parser(
        prog="gen_img.py",
        description="Generate images with Stable Diffusion 1.x / 2.x checkpoints.",
        epilog="Prompt options (inside a prompt, with spaces around them): --n negative prompt, --w width, "
        "--h height, --s steps, --d seeds, --l scale, --nl negative scale, --am network multipliers, "
        "--c CLIP prompt, --f file name, ... (docs/options.md lists them all).",
    )
    g = p.add_argument_group("model")
    g.add_argument("--ckpt", help="checkpoint file, Diffusers folder, glob or Hugging Face ID in the local cache "
                   "(default: the tiny demo model, created on first use; it makes noise, not pictures)")
    g.add_argument("--vae", help="separate VAE: single file or Diffusers folder")
    g.add_argument("--v1", action="store_true", help="assert an SD 1.x model (detected automatically)")
    g.add_argument("--v2", action="store_true", help="assert an SD 2.x model (detected automatically)")
    g.add_argument("--v_parameterization", action="store_true",
                   help="force v-prediction (otherwise read from the checkpoint)")
    g.add_argument("--tokenizer_cache_dir", help="folder to keep the tokenizer in (created on first use)")

    g = p.add_argument_group("image generation and output")
    g.add_argument("--outdir", default="outputs", help="output folder (default: outputs)")
    g.add_argument("--prompt", help="the prompt (prompt options like --n may be included)")
    g.add_argument("--from_file", help="file with one prompt per line (# comments and blank lines skipped)")
    g.add_argument("--from_module", help="Python file with get_prompter(args, pipe, networks)")
    g.add_argument("--interactive", action="store_true", help="read prompts from the terminal")
    g.add_argument("--no_preview", action="store_true", help="interactive mode: do not show images")
    g.add_argument("--W", type=int, default=512, help="image width (default 512)")
    g.add_argument("--H", type=int, default=512, help="image height (default 512)")
    g.add_argument("--steps", type=int, default=50, help="sampling steps (default 50)")
    g.add_argument("--scale", type=float, default=7.5, help="guidance scale (default 7.5)")
    g.add_argument("--sampler", default="ddim", metavar="NAME",
                   help="sampler (default ddim): " + ", ".join(sampler_names()))
    g.add_argument("--ddim_eta", type=float, default=0.0, help="eta for ddim (default 0)")
    g.add_argument("--images_per_prompt", type=int, default=1, help="images per prompt (default 1)")
    g.add_argument("--n_iter", type=int, default=1, help="times to repeat all prompts (default 1)")
    g.add_argument("--seed", type=int, help="seed of a single image, or of the per-image seed sequence")
    g.add_argument("--iter_same_seed", action="store_true", help="same seed for every --n_iter round")
    g.add_argument("--shuffle_prompts", action="store_true", help="shuffle the prompts in each round")
    g.add_argument("--sequential_file_name", action="store_true", help="name files im_000001.png, ...")
    g.add_argument("--clip_skip", type=int, help="use the text encoder's N-th layer from the end "
                   "(default 1 for SD1, 2 for SD2)")
    g.add_argument("--max_embeddings_multiples", type=int, default=None,
                   help="prompt length in multiples of 75 tokens (default 1: 75 tokens)")
    g.add_argument("--negative_scale", type=float, help="separate guidance scale for the negative prompt")
    g.add_argument("--emb_normalize_mode", choices=["original", "abs", "none"], default="original",
                   help="restore the embedding mean after weighting (default original)")

    g = p.add_argument_group("prompt language")
    g.add_argument("--textual_inversion_embeddings", nargs="*", default=[], metavar="FILE",
                   help="Textual Inversion files (.pt/.safetensors/.bin); the file name without extension "
                   "is the prompt word")
    g.add_argument("--XTI_embeddings", nargs="*", default=[], metavar="FILE",
                   help="Extended Textual Inversion files (one embedding per U-Net layer); used like "
                   "--textual_inversion_embeddings")

    g = p.add_argument_group("memory and speed")
    g.add_argument("--batch_size", type=int, default=1, help="images per U-Net batch (default 1)")
    g.add_argument("--vae_batch_size", type=float, default=None,
                   help="images per VAE decode: a count, or a fraction of the batch below 1 (default: batch size)")
    g.add_argument("--no_half_vae", action="store_true", help="run the VAE in fp32")
    g.add_argument("--fp16", action="store_true", help="compute in float16")
    g.add_argument("--bf16", action="store_true", help="compute in bfloat16 (also fast on CPUs with AMX)")
    g.add_argument("--sdpa", action="store_true", help="PyTorch scaled-dot-product attention everywhere (default: "
                   "the same, except blocked exact attention for CPU bf16 self-attention, docs/performance.md)")
    g.add_argument("--xformers", action="store_true", help="xformers attention (must be installed)")
    g.add_argument("--diffusers_xformers", action="store_true", help="same as --xformers")
    g.add_argument("--opt_channels_last", action="store_true", help="channels-last memory layout for the U-Net")
    g.add_argument("--compile", action="store_true", help="torch.compile the U-Net and VAE decoder (compiles on the "
                   "first image of each size, minutes on a CPU; cached on disk for later runs)")
    g.add_argument("--device", default=None, help="cuda, cpu, mps, ... (default: cuda if available)")
    g.add_argument("--noise_device", choices=["cpu", "device"], default="device",
                   help="where seeds' noise is drawn: 'cpu' gives the same noise on every machine "
                   "(default: the compute device, as the original)")

    _add_img2img_group(p)
    _add_controlnet_group(p)

    g = p.add_argument_group("additional networks (LoRA)")
    g.add_argument("--network_module", nargs="*", default=[], help="module per network, e.g. networks.lora")
    g.add_argument("--network_weights", nargs="*", default=[], help="weight file per network")
    g.add_argument("--network_mul", type=float, nargs="*", default=[], help="multiplier per network (default 1)")
    g.add_argument("--network_args", nargs="*", default=[], help='"key=value,..." per network')
    g.add_argument("--network_show_meta", action="store_true", help="print each network file's metadata")
    g.add_argument("--network_merge", action="store_true", help="merge the networks into the weights")
    g.add_argument("--network_merge_n_models", type=int, help="merge only the first N networks")
    g.add_argument("--network_pre_calc", action="store_true",
                   help="pre-compute network weights for each prompt (merged speed, --am still works)")
    return p


class DefaultValue(int):
    """An option's default value, told apart from the same number typed by the user.

    img2img keeps the source's size unless `--W/--H` are given, so it must know whether
    they were; the parser's `--W/--H` defaults are wrapped in this type (`size_given`).
    """


def size_given(args: argparse.Namespace, name: str) -> bool:
    """Whether `--W` / `--H` (name "W" / "H") was given on the command line."""
    return not isinstance(getattr(args, name), DefaultValue)


def _add_img2img_group(p: argparse.ArgumentParser) -> None:
    """img2img, inpainting, Highres fix and the VAE memory options (docs/img2img.md)."""
    for action in p._actions:
        if action.dest in ("W", "H"):
            action.default = DefaultValue(action.default)
    g = p.add_argument_group("img2img, inpainting and Highres fix")
    g.add_argument("--image_path", help="img2img source image, or a folder of them (used in file-name order, in turn); "
                   "without --W/--H the source's size (rounded down to multiples of 8) is kept")
    g.add_argument("--strength", type=float, default=0.8,
                   help="img2img strength 0..1 (default 0.8): int(steps*strength) steps are run; --t per prompt")
    g.add_argument("--mask_path", "--mask_image", dest="mask_path",
                   help="inpainting mask (white = repaint), or a folder of masks (the k-th for the k-th source)")
    g.add_argument("--use_original_file_name", action="store_true",
                   help="img2img: name each output after its source image")
    g.add_argument("--highres_fix_scale", type=float, default=None,
                   help="Highres fix: make a 1st image at this fraction of --W/--H (e.g. 0.5), then upscale it "
                   "with img2img")
    g.add_argument("--highres_fix_steps", type=int, default=28, help="Highres fix: steps of the 1st stage (default 28)")
    g.add_argument("--highres_fix_strength", type=float, default=None,
                   help="Highres fix: strength of the 2nd stage (default: --strength)")
    g.add_argument("--highres_fix_save_1st", action="store_true", help="Highres fix: also save the 1st-stage image")
    g.add_argument("--highres_fix_latents_upscaling", nargs="?", const="bilinear", choices=["bilinear", "bicubic"],
                   help="Highres fix: upscale the 1st stage's latents (bilinear when given alone, or bicubic) "
                   "instead of its image (Lanczos)")
    g.add_argument("--highres_fix_upscaler", metavar="MODULE",
                   help="Highres fix: upscaler module with create_upscaler(**kwargs), e.g. tools.latent_upscaler")
    g.add_argument("--highres_fix_upscaler_args", metavar='"k=v,..."',
                   help='arguments of --highres_fix_upscaler, e.g. "weights=upscaler.safetensors"')
    g.add_argument("--highres_fix_disable_control_net", action="store_true",
                   help="Highres fix: no ControlNet in the 2nd stage")
    g.add_argument("--vae_slices", type=int, default=None,
                   help="decode/encode in N horizontal slices: same image, much less memory, about 2x slower VAE")
    g.add_argument("--vae_tiling", action="store_true",
                   help="decode/encode in overlapping tiles (diffusers): for images too large even for "
                   "--vae_slices; tiles are blended, so the image differs slightly")


def _add_controlnet_group(p: argparse.ArgumentParser) -> None:
    """ControlNet options (docs/controlnet.md); one value for all models or one per model."""
    g = p.add_argument_group("ControlNet")
    g.add_argument("--control_net_models", nargs="+", metavar="MODEL",
                   help="ControlNet 1.0 files (normal or diff) or Diffusers ControlNet folders; with several, "
                   "they take turns, one per step")
    g.add_argument("--guide_image_path", metavar="PATH",
                   help="hint image for ControlNet, or a folder of them (used in file-name order, in turn)")
    g.add_argument("--control_net_preps", nargs="+", metavar="PREP",
                   help="preprocessing per model: none (default), canny, or canny_LOW_HIGH (e.g. canny_63_191)")
    g.add_argument("--control_net_weights", type=float, nargs="+", metavar="W",
                   help="weight per model (default 1.0; 0.5 = half the influence)")
    g.add_argument("--control_net_ratios", type=float, nargs="+", metavar="R",
                   help="fraction of the steps, from the first, each model is used in (default 1.0)")


def validate_controlnet(args: argparse.Namespace) -> None:
    """ControlNet options: a guide for the models, models for the guide, counts and ranges."""
    models = args.control_net_models or []
    if models and args.guide_image_path is None:
        raise UserError("--control_net_models needs --guide_image_path (the hint image or folder)")
    if not models:
        for name in ("guide_image_path", "control_net_preps", "control_net_weights", "control_net_ratios"):
            if getattr(args, name) is not None:
                raise UserError(f"--{name} needs --control_net_models")
        return  # --highres_fix_disable_control_net alone is harmless: accepted, as in the original
    for name in ("control_net_preps", "control_net_weights", "control_net_ratios"):
        values = getattr(args, name) or []
        if len(values) not in (0, 1, len(models)):
            raise UserError(f"--{name} has {len(values)} values but --control_net_models has {len(models)}; "
                            "give one value for all or one per model")
    for ratio in args.control_net_ratios or []:
        if not 0 <= ratio <= 1:
            raise UserError(f"--control_net_ratios {ratio}: must be between 0 and 1")


def validate_img2img(args: argparse.Namespace) -> None:
    """The img2img / Highres fix / VAE memory options: ranges and combinations."""
    for name in ("strength", "highres_fix_strength"):
        value = getattr(args, name)
        if value is not None and not 0 <= value <= 1:
            raise UserError(f"--{name} {value}: must be between 0 and 1")
    if args.image_path is None:
        for name in ("mask_path", "use_original_file_name"):
            if getattr(args, name):
                raise UserError(f"--{name} needs --image_path (the images to work on)")
    if args.highres_fix_scale is not None:
        if not 0 < args.highres_fix_scale <= 1:
            raise UserError(f"--highres_fix_scale {args.highres_fix_scale}: must be above 0 and at most 1 "
                            "(the 1st stage's size as a fraction of --W/--H)")
        if args.image_path is not None:
            raise UserError("--highres_fix_scale and --image_path exclude each other (as in the original); for the "
                            "2nd stage alone, run img2img on the 1st-stage images with --W/--H")
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


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and validate; a bad combination exits with one line and status 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        validate(args)
    except UserError as exc:
        parser.error(str(exc))
    return args


def validate(args: argparse.Namespace) -> None:
    """Check what argparse cannot: ranges, exclusive options, sampler names."""
    from library.samplers import resolve

    resolve(args.sampler)
    sources = [o for o in ("prompt", "from_file", "from_module", "interactive") if getattr(args, o)]
    if len(sources) > 1:
        raise UserError(f"give one prompt source, not {' and '.join('--' + s for s in sources)}")
    if not sources and args.image_path is None:
        raise UserError("no prompt: give --prompt, --from_file, --from_module or --interactive "
                        "(or --image_path with images that have prompts in their metadata)")
    if args.fp16 and args.bf16:
        raise UserError("--fp16 and --bf16 exclude each other")
    if args.v1 and args.v2:
        raise UserError("--v1 and --v2 exclude each other")
    validate_img2img(args)
    validate_controlnet(args)
    for name in ("W", "H"):
        value = getattr(args, name)
        if value < 8 or value % 8:
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
    if args.network_mul and len(args.network_mul) != n:
        raise UserError(f"--network_mul has {len(args.network_mul)} values but --network_module has {n}")
    if args.network_args and len(args.network_args) != n:
        raise UserError(f"--network_args has {len(args.network_args)} values but --network_module has {n}")
    if args.network_merge and args.network_pre_calc:
        raise UserError("--network_merge and --network_pre_calc exclude each other")


def vae_batch_size(value: float | None, batch_size: int) -> int:
    """`--vae_batch_size` as a count: a value below 1 is a fraction of the batch size."""
    if value is None:
        return batch_size
    if value < 1:
        return max(1, int(batch_size * value))
    return int(value)
