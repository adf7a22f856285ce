"""Checks of every input file and of `--outdir` before any model file is opened.

A run that would fail on a missing prompt file, an unreadable image or a read-only output
folder should fail in a second, not after the model has loaded. `check_inputs` only looks:
it reads prompt files and image headers (never decodes an image, never runs a module's
code: `--from_module` is compiled, not executed) and of model files only a `.safetensors`
checkpoint's header and a Diffusers folder's `config.json` files (`check_model_header`: the
sizes, `--clip_skip` and Deep Shrink depths the model allows), and leaves no file behind (the
`--outdir` write test removes its temporary file).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import stat
import tempfile
from collections.abc import Iterable
from pathlib import Path

from library.errors import NothingToDo, UserError, first_line
from library.records.options import GuidanceOptions, Options, RoundOptions


def check_inputs(options: Options) -> None:
    """Every input named by `options` exists and can be read, and `--outdir` can be written."""
    check_prompt_source(options.rounds)
    images = (("--image_path", options.sources.image_path), ("--mask_path", options.sources.mask_path),
              ("--guide_image_path", options.controlnet.guide_image_path))
    for option, spec in images:
        if spec is not None:
            check_images(list(spec) if isinstance(spec, tuple) else spec, option)
    for option, spec in (("--ckpt", options.load.ckpt), ("--vae", options.load.vae)):
        if spec:
            check_model(spec, option)
    for spec in options.controlnet.models:
        check_model(spec, "--control_net_models")
    files = (("--network_weights", options.networks.weights),
             ("--textual_inversion_embeddings", options.text.textual_inversion_embeddings),
             ("--XTI_embeddings", options.text.xti_embeddings),
             ("--hypernetwork", options.dialect.hypernetworks),
             ("--styles", (options.dialect.styles,) if options.dialect.styles else ()))
    for option, paths in files:
        for path in paths:
            check_file(path, option)
    for option, folders in (("--lora_dir", options.dialect.lora_dirs),
                            ("--hypernetwork_dir", options.dialect.hypernetwork_dirs)):
        for folder in folders:
            if not Path(folder).is_dir():
                raise UserError(f"{option} {folder}: no such folder")
    if options.dialect.styles:
        from library.prompts.styles import read_styles

        read_styles(options.dialect.styles)
    check_network_modules(options.networks.modules)
    check_model_families(options)
    check_size_conditioning(options)
    check_guidance_models(options.guidance)
    check_outdir(options.output.outdir)
    check_before_load(options)
    if options.load.ckpt:
        check_model_header(options)


def check_model_header(options: Options) -> None:
    """`--W/--H`, `--clip_skip` and the Deep Shrink depths against what the checkpoint's header
    tells (`library.models.header`), with the messages of the checks after the load; a header
    that tells nothing (a pickle) leaves them to those checks."""
    from library.models.checkpoint import resolve_model_path
    from library.models.header import read_shape
    from library.records.limits import MAX_SIDE

    shape = read_shape(resolve_model_path(options.load.ckpt, "--ckpt"))
    if shape is None:
        return
    g = options.generation
    for name, value, given in (("W", g.width, g.width_given), ("H", g.height, g.height_given)):
        if given and value < shape.min_side:
            raise UserError(f"--{name} {value}: this model makes {shape.min_side} to {MAX_SIDE} pixels a side")
    skip = options.text.clip_skip
    if skip is not None and skip > shape.text_layers:
        raise UserError(f"--clip_skip {skip}: the text encoder has only {shape.text_layers} layers; "
                        f"use 1 to {shape.text_layers}")
    if g.deep_shrink is not None:
        for name, depth in (("depth 1 (--ds_depth_1/--dsd1)", g.deep_shrink.depth_1),
                            ("depth 2 (--ds_depth_2/--dsd2)", g.deep_shrink.depth_2)):
            if depth is not None and not 0 <= depth < shape.down_blocks:
                raise UserError(f"Deep Shrink {name} {depth}: this U-Net's down blocks are 0 to "
                                f"{shape.down_blocks - 1}")
    if g.deep_shrink is not None and (options.sources.image_path is None or (g.width_given and g.height_given)):
        g.deep_shrink.check_size(g.width, g.height, shape.vae_scale)  # the size is known: every line has it
    if g.gradual_latent is not None and (options.sources.image_path is None or (g.width_given and g.height_given)):
        g.gradual_latent.check_size(g.width, g.height, shape.vae_scale)


def check_model_families(options: Options) -> None:
    """An SDXL LoRA / embedding with an SD 1.x/2.x checkpoint, or the reverse, where the files'
    headers tell (`library.models.family_headers`; nothing but headers and configs is read)."""
    from library.models.checkpoint import resolve_model_path
    from library.models.family_headers import checkpoint_family, embedding_generation, lora_generation

    if not options.load.ckpt:
        return
    family = checkpoint_family(resolve_model_path(options.load.ckpt))
    if family is None:
        return
    model = "an SDXL" if family == "sdxl" else f"an SD {family[2]}.x"
    wanted = "SDXL" if family == "sdxl" else "SD 1.x/2.x"
    kinds = (("--network_weights", "LoRA", options.networks.weights, lora_generation),
             ("--textual_inversion_embeddings", "embedding", options.text.textual_inversion_embeddings,
              embedding_generation))
    for option, what, paths, generation in kinds:
        for path in paths:
            found = generation(Path(path))
            if found is not None and (found == "sdxl") != (family == "sdxl"):
                made_for = "an SDXL" if found == "sdxl" else "an SD 1.x/2.x"
                raise UserError(f"{option} {path}: {made_for} {what}, but --ckpt {options.load.ckpt} is {model} "
                                f"model; use {'an' if what == 'embedding' else 'a'} {what} made for {wanted}")


def check_size_conditioning(options: Options) -> None:
    """SDXL's `--original_*` / `--crop_*` with an SD 1.x/2.x checkpoint, where its header tells
    (otherwise `library.records.options.for_model` refuses them once the model is read)."""
    from library.models.checkpoint import resolve_model_path
    from library.models.family_headers import checkpoint_family
    from library.records.options import for_model

    sizes = options.generation.sizes
    if options.load.ckpt and sizes is not None and sizes.given:
        family = checkpoint_family(resolve_model_path(options.load.ckpt))
        if family is not None:
            for_model(options, family)


def check_prompt_source(rounds: RoundOptions) -> None:
    """`--from_file` readable with at least one prompt line; `--from_module` valid Python."""
    from library.prompts.sources import read_prompt_file

    if rounds.from_file is not None and not len(read_prompt_file(rounds.from_file)):
        raise NothingToDo(f"--from_file {rounds.from_file}: no prompt lines (only blank lines and # comments); "
                          "nothing to do")
    if rounds.from_module is not None:
        check_python_file(rounds.from_module, "--from_module")


def check_python_file(path: str, option: str) -> None:
    """`path` is a file of Python source (compiled to check it, not run)."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"{option} {path}: no such file")
    try:
        compile(file.read_bytes(), str(file), "exec", dont_inherit=True)
    except OSError as exc:
        raise UserError(f"{option} {path}: cannot read it ({exc.strerror})") from None
    except (SyntaxError, ValueError) as exc:
        where = f", line {exc.lineno}" if getattr(exc, "lineno", None) else ""
        detail = exc.msg if isinstance(exc, SyntaxError) else first_line(exc, 80)
        raise UserError(f"{option} {path}: not a Python file ({type(exc).__name__}{where}: {detail})") from None


def check_file(path: str, option: str) -> None:
    """`path` is a regular file this process may read (opened and closed, nothing read)."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise UserError(f"{option} {path}: {_reason(exc)}") from None
    if not stat.S_ISREG(mode):
        raise UserError(f"{option} {path}: not a file")
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise UserError(f"{option} {path}: cannot read it ({exc.strerror})") from None


def check_guidance_models(guidance: GuidanceOptions) -> None:
    """The CLIP / VGG16 files that guidance with a non-zero scale will load are there."""
    if guidance.clip_scale or guidance.clip_image_scale:
        from library.models.clip_guidance import check_clip_model

        check_clip_model(guidance.clip_model,
                         "--clip_guidance_scale" if guidance.clip_scale else "--clip_image_guidance_scale")
    if guidance.vgg16_scale:
        from library.models.vgg16 import weights_file

        weights_file(guidance.vgg16_weights)


def check_model(spec: str, option: str) -> None:
    """A model spec resolves (file, folder, glob or cached Hugging Face ID) and is readable.

    The file itself is not opened: that is the loader's job, after these checks.
    """
    from library.models.checkpoint import resolve_model_path

    path = resolve_model_path(spec, option)
    if not os.access(path, os.R_OK):
        raise UserError(f"{option} {spec}: cannot read it (permission denied)")


def check_images(spec: str | list[str], option: str) -> None:
    """The images of `spec` (a file or folder, or several) are image files within the size limit
    (headers only)."""
    from library.images.input_images import check_image_file, list_images

    for one in [spec] if isinstance(spec, str) else spec:
        for path in list_images(Path(one), option):
            check_image_file(path)


def check_network_modules(names: Iterable[str]) -> None:
    """Each `--network_module` imports and has `create_network_from_weights`."""
    for name in dict.fromkeys(names):
        try:
            module = importlib.import_module(name)
        except ImportError as exc:
            raise UserError(f"--network_module {name}: cannot import it ({first_line(exc)})") from None
        if not callable(getattr(module, "create_network_from_weights", None)):
            raise UserError(f"--network_module {name}: the module has no create_network_from_weights function "
                            "(use networks.lora)")


def check_outdir(outdir: str) -> None:
    """`--outdir` is (or can become) a folder where files can be created.

    An existing folder gets a temporary file created and removed in it; a missing one is
    checked the same way in its nearest existing parent (the folder itself is made later,
    when the first image is written, as before).
    """
    if not str(outdir).strip():
        raise UserError("--outdir is empty: give the folder for the images (default: outputs)")
    folder = Path(outdir)
    probe = folder
    while not probe.exists() and probe != probe.parent:
        if probe.is_symlink():
            raise UserError(f"--outdir {outdir}: {probe} is a broken symlink")
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"--outdir {outdir}: {'it' if probe == folder else probe} is not a folder; give a folder path")
    try:
        with tempfile.TemporaryFile(dir=probe, prefix=".gen_img-write-test-"):
            pass
    except OSError as exc:
        where = "" if probe == folder else f" (in {probe})"
        raise UserError(f"--outdir {outdir}: cannot create files there{where} ({exc.strerror})") from None


#: Free space `--outdir` needs at the start (a few images' worth): less is a full disk.
MIN_FREE_BYTES = 16 * 1024 * 1024
MIN_SOURCE_SIDE = 8


def check_before_load(options: Options) -> None:
    """What the options and files already tell and the model load used to find later: the
    `--network_args` texts, the tokenizer cache folder, the upscaler module, img2img sources
    too small to make an image from, and a full disk under `--outdir`."""
    from library.records.network_args import parse_network_args

    for text in options.networks.args or ():
        parse_network_args(text)
    cache = options.load.tokenizer_cache_dir
    if cache and Path(cache).exists() and not Path(cache).is_dir():
        raise UserError(f"--tokenizer_cache_dir {cache}: is not a folder; give a folder path")
    if options.highres.upscaler:
        check_upscaler_module(options.highres.upscaler)
    g = options.generation
    if options.sources.image_path is not None and not (g.width_given and g.height_given):
        check_source_sizes(options.sources.image_path)
    check_free_space(options.output.outdir)


def check_upscaler_module(name: str) -> None:
    """`--highres_fix_upscaler` can be found: a Python file that compiles, or a module on the
    path (found, not run; the manual's `tools.latent_upscaler` is shipped in the library)."""
    if name.endswith(".py"):
        check_python_file(name, "--highres_fix_upscaler")
        return
    if name == "tools.latent_upscaler":
        return
    try:
        found = importlib.util.find_spec(name)
    except (ImportError, ValueError) as exc:
        raise UserError(f"--highres_fix_upscaler {name}: cannot import it ({first_line(exc)})") from None
    if found is None:
        raise UserError(f"--highres_fix_upscaler {name}: cannot import it (no module named {name!r})")


def check_source_sizes(spec) -> None:
    """img2img sources used at their own size are at least `MIN_SOURCE_SIDE` pixels a side (headers only)."""
    from PIL import Image

    from library.images.input_images import list_images

    for one in [spec] if isinstance(spec, str) else spec:
        for path in list_images(Path(one), "--image_path"):
            with Image.open(path) as image:
                width, height = image.size
            if min(width, height) < MIN_SOURCE_SIDE:
                raise UserError(f"--image_path {path}: {width}x{height} pixels; a source used at its own size needs "
                                f"at least {MIN_SOURCE_SIDE} pixels a side (or give --W and --H)")


def check_free_space(outdir: str) -> None:
    """The disk under `--outdir` has room for a few images (`MIN_FREE_BYTES`)."""
    probe = Path(outdir)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = shutil.disk_usage(probe).free
    except OSError:
        return
    if free < MIN_FREE_BYTES:
        raise UserError(f"--outdir {outdir}: the disk is full ({free // 1024} KiB free); free some space first")


def _reason(exc: OSError) -> str:
    """`no such file` / `permission denied` / the OS's words."""
    if isinstance(exc, FileNotFoundError):
        return "no such file"
    if isinstance(exc, PermissionError):
        return "cannot read it (permission denied)"
    return f"cannot read it ({exc.strerror})"
