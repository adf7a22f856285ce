"""The CLIP model of CLIP guidance: a transformers `CLIPModel` from local files only.

`--clip_model` may be

* a folder as `CLIPModel.save_pretrained` / a Hugging Face download writes it (``config.json``
  and ``model.safetensors`` or ``pytorch_model.bin``);
* a single weight file (``.safetensors``, ``.bin``, ``.pt``) in transformers' key layout; a
  ``config.json`` next to it is used, otherwise the configuration is read from the tensor
  shapes (64-wide attention heads and ``gelu``, as in LAION's ViT-B/32 the original uses);
* a Hugging Face ID, found in the local cache only (default: the original's
  ``laion/CLIP-ViT-B-32-laion2B-s34B-b79K``).

Nothing is downloaded; a missing or unreadable model is one line naming the option and
what to get. Weight files, also those of a folder, are read by `library.models.checkpoint`
(pickles with ``weights_only``), so a pickle that wants to run code, a damaged or a
huge-header file is the same one line as on every other loading path.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch

from library.errors import UserError, first_line

logger = logging.getLogger(__name__)

#: The original's CLIP model (`gen_img_diffusers.py`'s CLIP_MODEL_PATH).
DEFAULT_CLIP_MODEL = "laion/CLIP-ViT-B-32-laion2B-s34B-b79K"
_GET = (f"download {DEFAULT_CLIP_MODEL} (huggingface-cli download {DEFAULT_CLIP_MODEL}) "
        "and give its folder with --clip_model")


#: a folder's weight files, in the order transformers prefers them
_FOLDER_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


def load_clip_model(name: str | None, device: torch.device, dtype: torch.dtype,
                    scale_option: str = "--clip_guidance_scale"):
    """The CLIPModel of `--clip_model` (None: the default ID from the local cache), frozen, eval.

    `scale_option`: the guidance option that asked for it, named when no model is given."""
    from transformers import CLIPModel

    given = name or DEFAULT_CLIP_MODEL
    path = Path(given)
    try:
        weights = next((path / f for f in _FOLDER_WEIGHTS if (path / f).is_file()), None)
        if path.is_dir() and weights is not None:
            model = _from_single_file(weights)  # its config.json beside it
        elif path.is_dir():  # sharded weights: transformers reads them (weights only)
            model = CLIPModel.from_pretrained(str(path), local_files_only=True)
        elif path.is_file():
            model = _from_single_file(path)
        elif name is not None and not is_model_id(name):
            raise UserError(f"--clip_model {name}: no such file or folder; {_GET}")
        else:
            model = _from_cache(given, scale_option if name is None else None)
    except UserError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise UserError(f"--clip_model {given}: not a CLIPModel ({first_line(exc, 120)}); {_GET}") from None
    logger.info("CLIP guidance model %s (vision %s, projection %d)", given,
                model.config.vision_config.hidden_size, model.config.projection_dim)
    return model.to(device, dtype).eval().requires_grad_(False)


def is_model_id(name: str) -> bool:
    """Whether `name` reads as a Hugging Face ID (`owner/model`) rather than a path."""
    return not Path(name).suffix and re.fullmatch(r"[\w.-]+/[\w.-]+", name) is not None


def check_clip_model(name: str | None, scale_option: str = "--clip_guidance_scale") -> None:
    """The loader's one line for a CLIP model that is not there (a path, or an ID or the default
    not in the local Hugging Face cache), before any model loads."""
    if name is not None and not Path(name).exists() and not is_model_id(name):
        raise UserError(f"--clip_model {name}: no such file or folder; {_GET}")
    if name is None or (is_model_id(name) and not Path(name).exists()):
        from huggingface_hub import try_to_load_from_cache

        model_id = name or DEFAULT_CLIP_MODEL
        if not isinstance(try_to_load_from_cache(model_id, "config.json"), str):
            raise UserError(_not_cached(model_id, scale_option if name is None else None))


def _not_cached(model_id: str, scale_option: str | None) -> str:
    """The line for a model ID missing from the cache; `scale_option` when no --clip_model was given."""
    what = f"{scale_option} needs a CLIP model: no --clip_model given and" if scale_option else \
        f"--clip_model {model_id}:"
    return f"{what} {model_id} is not in the local Hugging Face cache; {_GET}"


def _from_cache(model_id: str, scale_option: str | None):
    from transformers import CLIPModel

    try:
        return CLIPModel.from_pretrained(model_id, local_files_only=True)
    except OSError:
        raise UserError(_not_cached(model_id, scale_option)) from None


def _from_single_file(path: Path):
    from transformers import CLIPConfig, CLIPModel

    state = _read_tensors(path)
    config_file = path.parent / "config.json"
    if config_file.is_file():
        config = CLIPConfig(**json.loads(config_file.read_text()))
    else:
        config = CLIPConfig(**config_from_shapes(state))
    model = CLIPModel(config)
    state = {k: v for k, v in state.items() if not k.endswith("position_ids")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"keys do not match: {len(missing)} missing ({missing[:2]}), {len(unexpected)} unexpected")
    return model


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The file's tensors, read as every checkpoint is (refusals and damage: their one line)."""
    from library.models.checkpoint import read_state_dict

    return read_state_dict(path)


def _layers(state: dict, prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"encoder\.layers\.(\d+)\.")
    return 1 + max(int(m.group(1)) for k in state if (m := pattern.match(k)))


def config_from_shapes(state: dict[str, torch.Tensor]) -> dict:
    """`CLIPConfig` arguments read from a transformers CLIPModel state dict's shapes."""
    token = state["text_model.embeddings.token_embedding.weight"]
    text_positions = state["text_model.embeddings.position_embedding.weight"].shape[0]
    patch = state["vision_model.embeddings.patch_embedding.weight"]
    vision_positions = state["vision_model.embeddings.position_embedding.weight"].shape[0]
    text_width, vision_width = token.shape[1], patch.shape[0]
    grid = round((vision_positions - 1) ** 0.5)
    text = dict(vocab_size=token.shape[0], hidden_size=text_width, max_position_embeddings=text_positions,
                intermediate_size=state["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
                num_hidden_layers=_layers(state, "text_model."), num_attention_heads=max(1, text_width // 64),
                hidden_act="gelu", bos_token_id=49406, eos_token_id=49407, pad_token_id=1)
    vision = dict(hidden_size=vision_width, patch_size=patch.shape[-1], image_size=grid * patch.shape[-1],
                  intermediate_size=state["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
                  num_hidden_layers=_layers(state, "vision_model."), num_attention_heads=max(1, vision_width // 64),
                  hidden_act="gelu")
    return dict(text_config=text, vision_config=vision, projection_dim=state["text_projection.weight"].shape[0])


def tiny_clip_config() -> dict:
    """`CLIPConfig` arguments of the tiny random CLIP for tests: ViT-B/32's geometry (224 px,
    32 px patches, 77 tokens, SD's 49,408-token vocabulary), 32 wide, 2 layers per tower."""
    text = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=1, max_position_embeddings=77, hidden_act="gelu",
                bos_token_id=49406, eos_token_id=49407, pad_token_id=1)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=1,
                  image_size=224, patch_size=32, hidden_act="gelu")
    return dict(text_config=text, vision_config=vision, projection_dim=16)


def tiny_clip_model(seed: int = 0):
    """The tiny random CLIPModel (`tiny_clip_config`), weights drawn from `seed`."""
    from transformers import CLIPConfig, CLIPModel

    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = CLIPModel(CLIPConfig(**tiny_clip_config()))
    finally:
        torch.random.set_rng_state(generator_state)
    return model.eval().requires_grad_(False)
