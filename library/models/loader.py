"""One entry point that loads any SD 1.x / 2.x / XL model: `load_model`.

Single files in the original (LDM) layout are detected from their shapes
(`library.models.detect`), converted to Diffusers names with diffusers' own single-file
helpers, and assigned into networks built on the `meta` device, so no memory is spent on
random initialisation and tensors already in the wanted dtype are used without a copy.
Diffusers folders (and HF IDs from the local cache) load with `from_pretrained`.

SDXL has two text encoders: `text_encoder` is CLIP ViT-L (`CLIPTextModel`), `text_encoder_2`
OpenCLIP ViT-bigG as a `CLIPTextModelWithProjection` (its projection gives the pooled
vector), each with its own tokenizer (`tokenizer`, `tokenizer_2`: the same vocabulary, the
second padding with "!").
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import json
import logging
import pickle
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from library.errors import UserError, first_line
from library.models import checkpoint
from library.models.detect import (
    SD2_TE_PREFIX,
    SDXL_TE2_PREFIX,
    SDXL_VAE_SCALE,
    VAE_PREFIX,
    DetectionError,
    ModelSpec,
    detect_model,
    infer_vae_config,
    normalize_keys,
)

logger = logging.getLogger(__name__)

ENCODER_PREFIX = f"{VAE_PREFIX}encoder."  # the VAE encoder's LDM keys, after `normalize_keys`

Family = Literal["sd1", "sd2", "sdxl"]
#: What each family is called in messages, and the text encoder that tells it apart.
FAMILY_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}
_FAMILY_ENCODERS = {"sd1": "CLIP ViT-L text encoder", "sd2": "OpenCLIP ViT-H text encoder",
                    "sdxl": "CLIP ViT-L + OpenCLIP ViT-bigG text encoders"}
_FAMILY_FLAGS = {"sd1": "--v1", "sd2": "--v2", "sdxl": "--sdxl"}
VaeEncoder = Literal["eager", "lazy"]


@dataclass(frozen=True)
class ModelKind:
    """What a model is: its family and whether it predicts v (else epsilon)."""

    family: Family
    v_prediction: bool

    @property
    def name(self) -> str:
        return FAMILY_NAMES[self.family] + (" v-prediction" if self.v_prediction else "")

    @property
    def default_clip_skip(self) -> int:
        """1 for SD1, 2 for SD2 and SDXL, as the original tool."""
        return 1 if self.family == "sd1" else 2


@dataclass
class LoadedModel:
    """The networks of a checkpoint, ready to run, and what is known about it.

    `text_encoder_2` / `tokenizer_2` (OpenCLIP ViT-bigG) are SDXL's only, None otherwise.
    """

    text_encoder: torch.nn.Module
    tokenizer: object
    unet: torch.nn.Module
    vae: torch.nn.Module
    kind: ModelKind
    path: Path
    name: str
    text_encoder_2: torch.nn.Module | None = None
    tokenizer_2: object | None = None


def load_model(
    ckpt: str,
    *,
    vae: str | None = None,
    dtype: torch.dtype = torch.float32,
    vae_dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    v1: bool = False,
    v2: bool = False,
    sdxl: bool = False,
    v_parameterization: bool = False,
    tokenizer_cache_dir: str | Path | None = None,
    attention: str = "auto",
    vae_encoder: VaeEncoder = "eager",
) -> LoadedModel:
    """Load text encoder, tokenizer, U-Net and VAE of `ckpt`, plus its detected kind.

    `v1`/`v2`/`sdxl` must agree with what the weights are (a mismatch is a `UserError`);
    `v_parameterization` forces v-prediction, otherwise it comes from the checkpoint.
    `attention` picks the U-Net's attention processor for the run (`library.models.attention`:
    "auto" = blocked attention on CPU in bf16, diffusers' SDPA processor elsewhere).
    `vae_encoder="lazy"` leaves the VAE encoder of a single file (the checkpoint's or `vae`'s) in
    the file until something encodes (`library.models.lazy_encoder`); Diffusers folders load it.
    """
    from library.models.attention import set_attention
    from library.heap import limit_heap_retention, release_freed_memory

    from library.models.tokenizer import load_tokenizer

    given = [flag for flag, on in (("--v1", v1), ("--v2", v2), ("--sdxl", sdxl)) if on]
    if len(given) > 1:
        raise UserError(f"{' and '.join(given)} contradict each other; give at most one")
    path = checkpoint.resolve_model_path(ckpt)
    lazy = vae_encoder == "lazy"
    limit_heap_retention()
    with _collector_paused(), contextlib.ExitStack() as background:  # exit: background page-in done
        with_vae = vae is None  # with --vae the checkpoint's VAE is never built
        if path.is_dir():
            te, unet, vae_model, family, v_pred_source, te2 = _load_diffusers_folder(path, dtype, with_vae)
            diffusers_dir: Path | None = path
        else:
            te, unet, vae_model, family, v_pred_source, te2 = _load_single_file(
                path, dtype, background, vae_dtype, lazy, with_vae)
            diffusers_dir = None
        _check_family_flags(path, family, v1, v2, sdxl)
        v_pred = _decide_v_prediction(v_parameterization, v_pred_source)
        wanted_vae_dtype = safe_vae_dtype(family, vae_dtype or dtype)
        if wanted_vae_dtype != (vae_dtype or dtype):
            logger.info("SDXL's VAE overflows in float16 (NaN or black images): it runs in float32")
        if vae is not None:
            vae_model = load_vae(vae, wanted_vae_dtype, vae_encoder)
            if family == "sdxl":  # a VAE file cannot tell its scale; SDXL's latents use SDXL's
                vae_model.register_to_config(scaling_factor=SDXL_VAE_SCALE)
        if vae_model.dtype != wanted_vae_dtype:
            vae_model = vae_model.to(dtype=wanted_vae_dtype)
        kind = ModelKind(family, v_pred)
        logger.info("model %s: %s", path.name, kind.name)
        tokenizer = load_tokenizer(family, diffusers_dir=diffusers_dir, cache_dir=tokenizer_cache_dir)
        tokenizer_2 = None
        if te2 is not None:
            tokenizer_2 = load_tokenizer("sdxl-2", diffusers_dir=diffusers_dir, cache_dir=tokenizer_cache_dir)
        for module in (m for m in (te, te2, unet, vae_model) if m is not None):
            _move(module, torch.device(device)).eval().requires_grad_(False)
        set_attention(unet, attention)
    release_freed_memory()  # what the cast freed leaves before generation starts
    name = path.stem if path.is_file() else path.name
    return LoadedModel(te, tokenizer, unet, vae_model, kind, path, name, te2, tokenizer_2)


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector while a model loads.

    Loading makes tens of thousands of objects (modules, tensors, tokenizer entries) and no
    garbage cycles; each automatic collection then walks every object of the process (torch,
    transformers, diffusers), which cost up to 0.1 s per load of an SD-sized model.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _move(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """`module.to(device)`, skipped when every tensor is already there (a no-op `.to` walks it all)."""
    tensors = itertools.chain(module.parameters(), module.buffers())
    if all(t.device == device for t in tensors):
        return module
    return module.to(device)


# --- single files -------------------------------------------------------------------------


def _load_single_file(path: Path, dtype: torch.dtype, background: contextlib.ExitStack,
                      vae_dtype: torch.dtype | None = None, lazy_encoder: bool = False, with_vae: bool = True):
    """Networks from one LDM-layout file; pages of weights used as stored map in `background`
    (not those of a VAE encoder left for later, nor of a VAE not built: `with_vae` False gives None)."""
    raw = checkpoint.read_state_dict(path)
    pages = checkpoint.FilePages(path)
    v_flag = raw.get("v_pred")
    rename = normalize_keys(list(raw))
    sd = {new: raw[old] for old, new in rename.items()}
    vae_dtype = vae_dtype or dtype
    kept = (t for k, t in sd.items() if t.dtype == (vae_dtype if k.startswith(VAE_PREFIX) else dtype)
            and not (lazy_encoder and k.startswith(ENCODER_PREFIX)) and (with_vae or not k.startswith(VAE_PREFIX)))
    background.enter_context(checkpoint.paging_in(kept))
    try:
        spec = detect_model({k: tuple(v.shape) for k, v in sd.items()})
    except DetectionError as exc:
        raise UserError(f"{path}: not a Stable Diffusion 1.x/2.x/XL checkpoint ({exc})") from None
    logger.debug("detected %s", spec)
    vae_dtype = safe_vae_dtype(spec.family, vae_dtype)
    unet, vae, te = build_from_ldm(sd, spec, dtype, path, pages, vae_dtype, lazy_encoder, with_vae)
    te2 = None
    if spec.text_encoder_2 is not None:
        te2 = build_bigg_from_ldm(sd, spec.text_encoder_2, dtype, path, pages)
    source = _v_pred_from_file(path, v_flag)
    return te, unet, vae, spec.family, source, te2


def build_from_ldm(sd: dict[str, torch.Tensor], spec: ModelSpec, dtype: torch.dtype, path: Path,
                   pages: checkpoint.FilePages | None = None, vae_dtype: torch.dtype | None = None,
                   lazy_encoder: bool = False, with_vae: bool = True):
    """U-Net, VAE and text encoder from a canonical LDM state dict and its detected spec.

    `pages` (the file's mappings) lets the cast drop each source tensor's pages once copied;
    the VAE is made in `vae_dtype` (default `dtype`), its encoder on first use if `lazy_encoder`;
    with `with_vae` False (another VAE replaces it) it is not made and None is returned for it.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    with _empty_modules():
        unet = UNet2DConditionModel(**spec.unet)
        vae = AutoencoderKL(**spec.vae) if with_vae else None
        te = CLIPTextModel(CLIPTextConfig(**spec.text_encoder, attn_implementation="sdpa"))
    unet_sd = convert_ldm_unet_checkpoint(sd, dict(unet.config))
    vae_sd = convert_ldm_vae_checkpoint(sd, dict(vae.config)) if with_vae else {}
    if lazy_encoder and with_vae:
        vae_sd = _defer_encoder(vae, vae_sd, vae_dtype or dtype, f"{path}: VAE encoder", pages)
    if spec.family == "sd1":
        te_sd = convert_ldm_clip_checkpoint(sd)
    elif spec.family == "sdxl":  # CLIP ViT-L; `build_bigg_from_ldm` makes the second encoder
        te_sd = convert_ldm_clip_checkpoint({k: v for k, v in sd.items() if k.startswith("conditioner.embedders.0.")})
    else:
        te_sd = convert_open_clip_checkpoint(te, _without_last_block(sd, spec))
        te_sd = {k: v for k, v in te_sd.items() if not k.startswith("text_projection")}
    te_sd = _match_text_model_prefix(te_sd, te)
    parts = (("U-Net", unet, unet_sd, dtype), ("VAE", vae, vae_sd, vae_dtype or dtype), ("text encoder", te, te_sd, dtype))
    for name, module, state, part_dtype in (part for part in parts if part[1] is not None):
        _assign(module, state, part_dtype, f"{path}: {name}", pages)
    _add_position_ids(te)
    return unet, vae, te


def build_bigg_from_ldm(sd: dict[str, torch.Tensor], config: dict, dtype: torch.dtype, path: Path,
                        pages: checkpoint.FilePages | None = None) -> torch.nn.Module:
    """SDXL's OpenCLIP ViT-bigG text encoder (`conditioner.embedders.1.model.*`) as a
    `CLIPTextModelWithProjection`: fused `in_proj` q/k/v split, `text_projection` transposed
    (diffusers' OpenCLIP converter does both), every block kept."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    with _empty_modules():
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**config, attn_implementation="sdpa"))
    part = {k: v for k, v in sd.items() if k.startswith(SDXL_TE2_PREFIX)}
    state = convert_open_clip_checkpoint(te2, part, prefix=SDXL_TE2_PREFIX)
    state = {("text_model." + k if not k.startswith(("text_model.", "text_projection")) else k): v
             for k, v in state.items()}
    _assign(te2, state, dtype, f"{path}: second text encoder (OpenCLIP ViT-bigG)", pages)
    _add_position_ids(te2)
    return te2


def _add_position_ids(te: torch.nn.Module) -> None:
    """The non-persistent `position_ids` buffer a meta-built CLIP text model lacks."""
    max_positions = te.config.max_position_embeddings
    text_model(te).embeddings.register_buffer(
        "position_ids", torch.arange(max_positions).unsqueeze(0), persistent=False
    )


@contextlib.contextmanager
def _empty_modules() -> Iterator[None]:
    """Build modules on the `meta` device with torch's weight initialisers switched off.

    The weights are assigned from the checkpoint right after, so neither memory nor random
    initialisation is wasted on them; skipping the initialisers also saves ~40% of the
    construction time of an SD-sized U-Net (their calls dispatch through the meta device).
    diffusers and transformers each provide the switch for their own models.
    """
    from diffusers.models.modeling_utils import no_init_weights as diffusers_no_init
    from transformers.initialization import no_init_weights as transformers_no_init

    with torch.device("meta"), diffusers_no_init(), transformers_no_init():
        yield


def text_model(te: torch.nn.Module) -> torch.nn.Module:
    """The CLIP text transformer (transformers 4 nests it as `.text_model`, 5 does not)."""
    return getattr(te, "text_model", te)


def _match_text_model_prefix(state: dict[str, torch.Tensor], te: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Add or strip the `text_model.` key prefix to match the installed transformers."""
    nested = hasattr(te, "text_model")
    out = {}
    for k, v in state.items():
        bare = k.removeprefix("text_model.")
        out["text_model." + bare if nested else bare] = v
    return out


def _without_last_block(sd: dict[str, torch.Tensor], spec: ModelSpec) -> dict[str, torch.Tensor]:
    """SD2 text-encoder tensors minus the last resblock, which SD2 does not use."""
    last = f"{SD2_TE_PREFIX}transformer.resblocks.{spec.text_encoder['num_hidden_layers']}."
    return {k: v for k, v in sd.items() if k.startswith(SD2_TE_PREFIX) and not k.startswith(last)}


def _assign(module: torch.nn.Module, state: dict[str, torch.Tensor], dtype: torch.dtype, what: str,
            pages: checkpoint.FilePages | None = None) -> None:
    """Load `state` into a meta-device module without copies where dtypes already match.

    Tensors in another dtype are cast one at a time in file order; with `pages`, each source's
    mapped file pages are dropped right after its copy is made (`checkpoint.FilePages`).
    """
    state = cast_state(state, dtype, pages)
    expected = set(module.state_dict())
    missing, unexpected = expected - set(state), set(state) - expected
    if missing:
        raise UserError(f"{what} is incomplete: {len(missing)} tensors missing (e.g. {sorted(missing)[0]})")
    if unexpected:
        logger.debug("%s: ignoring %d unexpected tensors", what, len(unexpected))
        state = {k: v for k, v in state.items() if k in expected}
    try:
        module.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise UserError(f"{what}: tensor shapes do not fit together ({str(exc).splitlines()[1][:160]})") from None


def _defer_encoder(vae: torch.nn.Module, state: dict[str, torch.Tensor], dtype: torch.dtype, what: str,
                   pages: checkpoint.FilePages | None) -> dict[str, torch.Tensor]:
    """`state` (loaded in `dtype`) without the encoder's tensors, which a `LazyEncoder` at
    `vae.encoder` keeps for later."""
    from library.models.lazy_encoder import defer_encoder

    def assign(module: torch.nn.Module, part: dict[str, torch.Tensor], part_dtype: torch.dtype) -> None:
        _assign(module, part, part_dtype, what, pages)

    return defer_encoder(vae, state, assign, dtype)


def cast_state(state: dict[str, torch.Tensor], dtype: torch.dtype,
               pages: checkpoint.FilePages | None = None) -> dict[str, torch.Tensor]:
    """`state` with floating-point tensors in `dtype`, cast one by one (sources released by `pages`)."""
    out = dict(state)
    order = sorted((k for k, v in state.items() if v.is_floating_point() and v.dtype != dtype),
                   key=lambda k: state[k].data_ptr())
    for key in order:
        source = state[key]
        out[key] = source.to(dtype)
        if pages is not None:
            pages.release(source)
    return out


def _v_pred_from_file(path: Path, v_flag: torch.Tensor | None) -> tuple[bool, str] | None:
    """v-prediction evidence stored with a single file: a `v_pred` key or a `.yaml` beside it."""
    if v_flag is not None:  # a 0-dim 1/0 here and in kohya's tools; an empty tensor in ComfyUI's
        on = v_flag.numel() == 0 or bool(v_flag.flatten()[0])
        return on, "the checkpoint's v_pred key"
    for yaml_path in (path.with_suffix(".yaml"), path.with_suffix(".yml")):
        if yaml_path.is_file():
            text = yaml_path.read_text(encoding="utf-8", errors="replace")
            match = re.search(r"^\s*parameterization:\s*[\"']?(\w+)", text, re.MULTILINE)
            return (match is not None and match.group(1) == "v"), f"{yaml_path.name} beside the checkpoint"
    return None


# --- Diffusers folders --------------------------------------------------------------------


def _load_diffusers_folder(path: Path, dtype: torch.dtype, with_vae: bool = True):
    """Networks from a Diffusers folder; its vae/ is neither needed nor loaded when `with_vae` is False.
    An SDXL folder (a U-Net with `text_time` added conditioning) also loads text_encoder_2/."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    parts = ("unet", "vae", "text_encoder") if with_vae else ("unet", "text_encoder")
    absent = [p for p in parts if not (path / p / "config.json").is_file()]
    if absent:
        raise UserError(
            f"--ckpt {path}: not a Diffusers model folder (no {', '.join(p + '/config.json' for p in absent)}); "
            "pass a checkpoint file or a folder with unet/, vae/, text_encoder/"
        )
    try:
        unet = UNet2DConditionModel.from_pretrained(path / "unet", torch_dtype=dtype)
        vae = AutoencoderKL.from_pretrained(path / "vae", torch_dtype=dtype) if with_vae else None
        is_sdxl = unet.config.get("addition_embed_type") == "text_time"
        if is_sdxl and not (path / "text_encoder_2" / "config.json").is_file():
            raise UserError(f"--ckpt {path}: an SDXL Diffusers folder needs text_encoder_2/config.json, "
                            "which is missing")
        te2 = None
        with _quiet_transformers_progress():
            te = CLIPTextModel.from_pretrained(path / "text_encoder", torch_dtype=dtype, attn_implementation="sdpa")
            if is_sdxl:
                te2 = CLIPTextModelWithProjection.from_pretrained(
                    path / "text_encoder_2", torch_dtype=dtype, attn_implementation="sdpa")
    except pickle.UnpicklingError as exc:
        raise UserError(f"--ckpt {checkpoint.pickle_refusal(path, exc)}") from None
    except (OSError, ValueError, RuntimeError) as exc:
        raise UserError(f"--ckpt {path}: cannot load the Diffusers model ({first_line(exc)})") from None
    family: Family = "sdxl" if is_sdxl else "sd2" if te.config.hidden_act == "gelu" else "sd1"
    source = None
    scheduler_config = path / "scheduler" / "scheduler_config.json"
    if scheduler_config.is_file():
        prediction = json.loads(scheduler_config.read_text()).get("prediction_type")
        if prediction:
            source = (prediction == "v_prediction", f"scheduler/scheduler_config.json (prediction_type={prediction})")
    return te, unet, vae, family, source, te2


@contextlib.contextmanager
def _quiet_transformers_progress() -> Iterator[None]:
    """No "Loading weights" progress bar from transformers (it lands in the user's output)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


# --- VAE ----------------------------------------------------------------------------------


def load_vae(spec: str, dtype: torch.dtype, encoder: VaeEncoder = "eager") -> torch.nn.Module:
    """A separate VAE: single file (with or without `first_stage_model.`) or Diffusers folder;
    a single file's encoder on first use with `encoder="lazy"`."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    path = checkpoint.resolve_model_path(spec, "--vae")
    if path.is_dir():
        folder = path / "vae" if (path / "vae" / "config.json").is_file() else path
        if not (folder / "config.json").is_file():
            raise UserError(f"--vae {path}: folder has no config.json (nor vae/config.json); not a Diffusers VAE")
        try:
            return AutoencoderKL.from_pretrained(folder, torch_dtype=dtype)
        except pickle.UnpicklingError as exc:
            raise UserError(f"--vae {checkpoint.pickle_refusal(path, exc)}") from None
        except (OSError, ValueError, RuntimeError) as exc:
            raise UserError(f"--vae {path}: cannot load the Diffusers VAE ({first_line(exc)})") from None
    raw = checkpoint.read_state_dict(path)
    pages = checkpoint.FilePages(path)
    rename = normalize_keys(list(raw))
    sd = {new: raw[old] for old, new in rename.items() if new.startswith("first_stage_model.")}
    if not sd:
        raise UserError(f"--vae {path}: no VAE weights found (expected encoder.*/decoder.* tensors)")
    try:
        config = infer_vae_config({k[len("first_stage_model."):]: tuple(v.shape) for k, v in sd.items()})
    except (DetectionError, KeyError) as exc:
        raise UserError(f"--vae {path}: not a Stable Diffusion VAE ({exc})") from None
    with _empty_modules():
        vae = AutoencoderKL(**config)
    vae_sd = convert_ldm_vae_checkpoint(sd, dict(vae.config))
    if encoder == "lazy":
        vae_sd = _defer_encoder(vae, vae_sd, dtype, f"--vae {path}: encoder", pages)
    _assign(vae, vae_sd, dtype, f"--vae {path}", pages)
    logger.info("VAE from %s", path.name)
    return vae


# --- decisions ----------------------------------------------------------------------------


def safe_vae_dtype(family: Family, dtype: torch.dtype) -> torch.dtype:
    """The dtype the VAE runs in: `dtype`, except float32 for SDXL's VAE in float16, whose
    activations overflow float16 (NaN or black images); bfloat16 has float32's range and stays."""
    return torch.float32 if family == "sdxl" and dtype == torch.float16 else dtype


def _check_family_flags(path: Path, family: Family, v1: bool, v2: bool, sdxl: bool = False) -> None:
    """A `--v1`/`--v2`/`--sdxl` that names another family than the weights: one line naming the found one."""
    asserted = "sd1" if v1 else "sd2" if v2 else "sdxl" if sdxl else None
    if asserted is None or asserted == family:
        return
    flag = _FAMILY_FLAGS[asserted]
    raise UserError(
        f"{flag} was given but {path.name} is an {FAMILY_NAMES[family]} model ({_FAMILY_ENCODERS[family]}); "
        f"remove {flag}"
    )


def _decide_v_prediction(flag: bool, source: tuple[bool, str] | None) -> bool:
    """Flags win; then what the checkpoint carries; else epsilon-prediction. Logged."""
    if flag:
        logger.info("v-prediction: on (--v_parameterization)")
        return True
    if source is not None:
        logger.info("v-prediction: %s (from %s)", "on" if source[0] else "off", source[1])
        return source[0]
    logger.info("v-prediction: off (the checkpoint says nothing; use --v_parameterization for v models)")
    return False
