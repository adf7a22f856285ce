"""The command line: options grouped like the manual, same names and defaults.

`parse_options` returns the options as frozen records (`library.records.options`) after validation;
mistakes end with one line and exit status 2 (argparse's usage block is not printed,
`--help` shows everything).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import NoReturn

from library.cli import compat
from library.cli.validation import SDXL_ONLY_OPTIONS, SDXL_SIZE_OPTIONS, validate
from library.cli.webui_options import add_webui_groups
from library.errors import UserError
from library.messages import argparse_text
from library.records.options import Options, from_namespace


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        from library.run.distributed import speaks_for_the_run

        if speaks_for_the_run():  # every rank of a split run has the same arguments: rank 0 says it
            sys.stderr.write(f"{self.prog}: error: {argparse_text(message)} (see --help)\n")
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    """The full parser; every group corresponds to a section of the manual."""
    from library.records.samplers import sampler_names

    p = _Parser(
        prog="gen_img.py",
        description="Generate images with Stable Diffusion 1.x / 2.x / XL checkpoints.",
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
    g.add_argument("--sdxl", action="store_true", help="assert an SDXL model (detected automatically)")
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
    g.add_argument("--W", type=int, help="image width (default 512; img2img: the source's)")
    g.add_argument("--H", type=int, help="image height (default 512; img2img: the source's)")
    g.add_argument("--steps", type=int, default=50, help="sampling steps (default 50)")
    g.add_argument("--scale", type=float, default=7.5, help="guidance scale (default 7.5)")
    g.add_argument("--sampler", default="ddim", metavar="NAME",
                   help="sampler (default ddim): " + ", ".join(sampler_names())
                   + '; or the web UI\'s names, e.g. "Euler a", "DPM++ 2M Karras" (docs/webui.md)')
    g.add_argument("--ddim_eta", type=float, default=0.0, help="eta for ddim (default 0)")
    g.add_argument("--images_per_prompt", type=int, default=1, help="images per prompt (default 1)")
    g.add_argument("--n_iter", type=int, default=1, help="times to repeat all prompts (default 1)")
    g.add_argument("--seed", type=int, help="seed of a single image, or of the per-image seed sequence")
    g.add_argument("--iter_same_seed", action="store_true", help="same seed for every --n_iter round")
    g.add_argument("--shuffle_prompts", action="store_true", help="shuffle the prompts in each round")
    g.add_argument("--sequential_file_name", action="store_true", help="name files im_000001.png, ...")
    g.add_argument("--skip_existing", action="store_true",
                   help="do not make images whose files are in --outdir already (resume a stopped run; "
                   "default names match whatever their timestamp)")
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
    g.add_argument("--sdpa", action="store_true", help="PyTorch scaled-dot-product attention (the default)")
    g.add_argument("--blocked_attention", action="store_true",
                   help="CPU bf16: blocked exact self-attention instead of PyTorch's CPU flash kernel (a bf16 "
                   "512x512 U-Net call in 0.77x the time of diffusers' on a 2-core AMD EPYC; bf16 images "
                   "move by more than 1/255; docs/performance.md)")
    g.add_argument("--xformers", action="store_true",
                   help="xformers attention (without xformers installed: a warning, and PyTorch SDPA)")
    g.add_argument("--diffusers_xformers", action="store_true", help="same as --xformers")
    g.add_argument("--opt_channels_last", action="store_true", help="channels-last memory layout for the U-Net")
    g.add_argument("--compile", action="store_true", help="torch.compile the U-Net and VAE decoder (compiles on the "
                   "first image of each size, minutes on a CPU; cached on disk for later runs)")
    g.add_argument("--device", default=None, help="cuda, cpu, mps, ... (default: cuda if available)")
    g.add_argument("--noise_device", choices=["cpu", "device"], default="device",
                   help="where seeds' noise is drawn: 'cpu' gives the same noise on every machine "
                   "(default: the compute device, as the original)")

    _add_img2img_group(p)
    _add_high_resolution_group(p)
    _add_controlnet_group(p)
    _add_guidance_group(p)
    _add_original_compat_group(p)
    _add_sdxl_group(p)
    add_webui_groups(p)

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
    g.add_argument("--network_regional_mask_max_color_codes", type=int, default=None,
                   help="regional LoRA: read the --mask_path regions as exact colour codes (red, green, yellow, "
                   "blue, magenta, cyan, white) for the first N (1-7) parts, instead of R/G/B channels "
                   "(docs/regional.md)")
    _add_prompt_dialect_group(p)
    return p


def _add_prompt_dialect_group(p: argparse.ArgumentParser) -> None:
    """The web UI's prompt dialect (docs/webui.md): tag folders, hypernetworks, styles."""
    g = p.add_argument_group("web UI prompt dialect (docs/webui.md)")
    g.add_argument("--lora_dir", nargs="+", default=[],
                   help="folders where <lora:NAME:WEIGHT> tags find NAME.safetensors (also sub-folders; the "
                   "folders of --network_weights files are searched too)")
    g.add_argument("--hypernetwork_dir", nargs="+", default=[],
                   help="folders where <hypernet:NAME:MULT> tags find NAME.pt (also sub-folders)")
    g.add_argument("--hypernetwork", nargs="+", default=[],
                   help="hypernetwork .pt files (the web UI's layout) applied to every image")
    g.add_argument("--hypernetwork_mul", type=float, nargs="+", default=[],
                   help="multiplier per --hypernetwork file (default 1)")
    g.add_argument("--styles", default=None,
                   help="a web UI styles.csv (name,prompt,negative_prompt) for the prompt option --style NAME[,NAME]")


def _add_img2img_group(p: argparse.ArgumentParser) -> None:
    """img2img, inpainting, Highres fix and the VAE memory options (docs/img2img.md)."""
    g = p.add_argument_group("img2img, inpainting and Highres fix")
    g.add_argument("--image_path", help="img2img source image, or a folder of them (used in file-name order, in turn); "
                   "without --W/--H the source's size (rounded down to multiples of 32) is kept")
    g.add_argument("--strength", type=float, default=0.8,
                   help="img2img strength 0..1 (default 0.8): int(steps*strength) steps are run; --t per prompt")
    g.add_argument("--mask_path", "--mask_image", dest="mask_path",
                   help="inpainting mask (white = repaint), or a folder of masks (the k-th for the k-th source); "
                   "with networks or --attention_couple the region mask of the ' AND ' parts (docs/regional.md)")
    g.add_argument("--attention_couple", action="store_true",
                   help="read --mask_path as the region mask of the prompt's ' AND ' parts (not for inpainting), "
                   "also without networks")
    g.add_argument("--inpaint_with_networks", action="store_true",
                   help="with --network_module: read --mask_path as the inpainting mask (white = repaint), not as "
                   "the networks' region mask (the original's only reading)")
    g.add_argument("--use_original_file_name", action="store_true",
                   help="img2img: name each output after its source image")
    g.add_argument("--highres_fix_scale", type=float, default=None,
                   help="Highres fix: make a 1st image at this fraction of --W/--H (e.g. 0.5), then upscale it "
                   "with img2img")
    g.add_argument("--highres_fix_steps", type=int, default=28, help="Highres fix: steps of the 1st stage (default 28)")
    g.add_argument("--highres_fix_strength", type=float, default=None,
                   help="Highres fix with --image_path: strength of the img2img 1st stage (default: --strength); "
                   "the 2nd stage takes --strength, as the original")
    g.add_argument("--highres_fix_save_1st", action="store_true", help="Highres fix: also save the 1st-stage image")
    g.add_argument("--highres_fix_latents_upscaling", nargs="?", const="bicubic", choices=["bicubic", "bilinear"],
                   help="Highres fix: upscale the 1st stage's latents (bicubic when given alone, as the original; "
                   "or bilinear) instead of its image (Lanczos)")
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


def _add_high_resolution_group(p: argparse.ArgumentParser) -> None:
    """Deep Shrink and Gradual Latent (docs/deep_shrink.md); prompt lines override them."""
    g = p.add_argument_group("Deep Shrink and Gradual Latent")
    g.add_argument("--ds_depth_1", type=int, help="Deep Shrink: down block whose input is shrunk, 0 to 3 for "
                   "SD 1.x/2.x, input block 0 to 8 for SDXL (off when absent)")
    g.add_argument("--ds_timesteps_1", type=int, default=650,
                   help="Deep Shrink: shrink at depth 1 while the timestep is at least this (default 650)")
    g.add_argument("--ds_depth_2", type=int, help="Deep Shrink: second depth, used after --ds_timesteps_1")
    g.add_argument("--ds_timesteps_2", type=int, default=650,
                   help="Deep Shrink: shrink at depth 2 while the timestep is at least this (default 650)")
    g.add_argument("--ds_ratio", type=float, default=0.5, help="Deep Shrink: size ratio of the shrink (default 0.5)")
    g.add_argument("--gradual_latent_timesteps", type=int,
                   help="Gradual Latent: start enlarging the latent below this timestep, e.g. 750 (off when absent; "
                   "euler_a / k_euler_a)")
    g.add_argument("--gradual_latent_ratio", type=float, default=0.5,
                   help="Gradual Latent: starting size ratio (default 0.5)")
    g.add_argument("--gradual_latent_ratio_step", type=float, default=0.125,
                   help="Gradual Latent: ratio added at each enlargement (default 0.125)")
    g.add_argument("--gradual_latent_every_n_steps", "--gradual_latent_ratio_every_n_steps", type=int, default=3,
                   dest="gradual_latent_every_n_steps", help="Gradual Latent: steps between enlargements (default 3)")
    g.add_argument("--gradual_latent_s_noise", type=float, default=1.0,
                   help="Gradual Latent: noise multiplier of the enlarging steps (default 1.0)")
    g.add_argument("--gradual_latent_unsharp_params", metavar="K,SIGMA,STRENGTH[,TARGET_X]",
                   help='Gradual Latent: unsharp mask after each enlargement, e.g. "3,0.5,0.5,1"')


def _add_original_compat_group(p: argparse.ArgumentParser) -> None:
    """Options of the original's command line that the manual leaves out (docs/compatibility.md)."""
    g = p.add_argument_group("options of the original tool")
    g.add_argument("--force_scheduler_zero_steps_offset", action="store_true",
                   help="img2img / Highres fix 2nd stage: noise the source at the first step that runs "
                   "(offset 0 in the original's start rule; by default one step stronger, as the original)")
    g.add_argument("--console_log_level", type=str.upper, choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
                   help="log level of the console (default INFO)")
    g.add_argument("--console_log_file", metavar="FILE", help="write the log to this file instead of the console")
    g.add_argument("--console_log_simple", action="store_true", help="plain log lines, without level and name")
    g.add_argument("--prompter_module_args", metavar="TEXT",
                   help="free text for the --from_module prompter (it reads args.prompter_module_args)")
    g.add_argument("--zero_terminal_snr", action="store_true",
                   help="rescale the scheduler's betas to zero terminal SNR (ddim, euler, euler_a, dpmsolver, "
                   "dpmsolver++ and others whose diffusers class supports it)")
    g.add_argument("--noise_offset_prob", type=float, default=None, metavar="P",
                   help="probability that an image's start noise gets an offset (drawn from the image's own seed)")
    g.add_argument("--noise_offset_range", type=float, nargs=2, default=None, metavar=("MIN", "MAX"),
                   help="range of the noise offset (needed with --noise_offset_prob)")
    g.add_argument("--pyramid_noise_prob", type=float, default=None, metavar="P",
                   help="probability that an image's start noise is pyramid (multi-resolution) noise")
    g.add_argument("--pyramid_noise_discount_range", type=float, nargs=2, default=None, metavar=("MIN", "MAX"),
                   help="range of the pyramid noise discount (needed with --pyramid_noise_prob)")
    for name, nargs, kind in SDXL_ONLY_OPTIONS:
        sdxl_help = "the original's SDXL-only option: refused (not supported yet)"
        if nargs == 0:
            g.add_argument(f"--{name}", action="store_true", help=sdxl_help)
        else:
            g.add_argument(f"--{name}", nargs=nargs, type=kind, default=None, help=sdxl_help)


def _add_sdxl_group(p: argparse.ArgumentParser) -> None:
    """SDXL's size conditioning (docs/sdxl.md); refused with an SD 1.x/2.x model."""
    g = p.add_argument_group("SDXL size conditioning (SDXL models only)")
    for name, meaning in SDXL_SIZE_OPTIONS:
        g.add_argument(f"--{name}", type=int, default=None, metavar="N", help=meaning)


def _add_controlnet_group(p: argparse.ArgumentParser) -> None:
    """ControlNet options (docs/controlnet.md); one value per model, missing ones the defaults (`compat`)."""
    g = p.add_argument_group("ControlNet")
    g.add_argument("--control_net_models", nargs="+", metavar="MODEL",
                   help="ControlNet 1.0 files (normal or diff) or Diffusers ControlNet folders; with several, "
                   "they take turns, one per step")
    g.add_argument("--guide_image_path", nargs="+", metavar="PATH",
                   help="guide images for ControlNet and CLIP image / VGG16 guidance: files or folders (images "
                   "used in file-name order, in turn; several paths one after the other)")
    g.add_argument("--control_net_preps", nargs="+", metavar="PREP",
                   help="preprocessing per model: none (default), canny, or canny_LOW_HIGH (e.g. canny_63_191)")
    g.add_argument("--control_net_weights", "--control_net_multipliers", type=float, nargs="+", metavar="W",
                   help="weight per model (default 1.0; 0.5 = half the influence)")
    g.add_argument("--control_net_ratios", type=float, nargs="+", metavar="R",
                   help="fraction of the steps, from the first, each model is used in (default 1.0)")


def _add_guidance_group(p: argparse.ArgumentParser) -> None:
    """CLIP text, CLIP image and VGG16 guidance (docs/guidance.md)."""
    g = p.add_argument_group("CLIP and VGG16 guidance")
    g.add_argument("--clip_guidance_scale", type=float, default=0.0,
                   help="steer each step towards the prompt's (or --c text's) CLIP features (default 0: off; try 100)")
    g.add_argument("--clip_image_guidance_scale", type=float, default=0.0,
                   help="steer towards the CLIP features of the --guide_image_path image (default 0: off)")
    g.add_argument("--vgg16_guidance_scale", type=float, default=0.0,
                   help="steer towards the VGG16 features of the --guide_image_path image (default 0: off; try 100)")
    g.add_argument("--vgg16_guidance_layer", "--vgg16_guidance_layerP", dest="vgg16_guidance_layer", type=int,
                   default=20, help="index into VGG16's features compared (default 20: ReLU after conv4_2; 0..30)")
    g.add_argument("--clip_model", metavar="PATH",
                   help="CLIP model of CLIP guidance: transformers CLIPModel folder or file, or a Hugging Face ID "
                   "in the local cache (default laion/CLIP-ViT-B-32-laion2B-s34B-b79K from the cache)")
    g.add_argument("--vgg16_weights", metavar="FILE",
                   help="torchvision's VGG16 weights (vgg16-397923af.pth) for VGG16 guidance (default: "
                   "torchvision's cache, $TORCH_HOME/hub/checkpoints/)")


def parse_options(argv: Sequence[str] | None = None) -> Options:
    """The command line as frozen records (`library.records.options`); mistakes exit with one line."""
    return from_namespace(parse_args(argv))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and validate; a bad combination exits with one line and status 2."""
    from library.cli import regenerate

    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        argv, png_lines = regenerate.expand(argv, parser)  # --from_png: the PNGs' settings, then ours
    except UserError as exc:
        parser.error(str(exc))
    args = parser.parse_args(argv)
    args.startup_warnings = compat.adapt(args)  # the original's readings; gen_img.main logs them
    try:
        validate(args)
    except UserError as exc:
        parser.error(str(exc))
    args.png_lines = png_lines
    args.run_record = regenerate.run_record(args, parser)  # written into every image (`run-options`)
    return args


