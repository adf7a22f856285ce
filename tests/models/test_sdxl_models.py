"""SDXL models: kind, the tiny SDXL's structure, loading from a single file (Stability AI's
layout) and from a Diffusers folder, detection and the family flags."""

from __future__ import annotations

import pytest
import torch

from library.errors import UserError
from library.models import load_model
from library.models.loader import ModelKind
from library.models.tiny import build_tiny_components


def test_sdxl_kind_names_and_clip_skip():
    assert ModelKind("sdxl", False).name == "SDXL"
    assert ModelKind("sdxl", True).name == "SDXL v-prediction"
    assert ModelKind("sdxl", False).default_clip_skip == 2


def test_tiny_sdxl_has_sdxl_structure_in_miniature():
    c = build_tiny_components("sdxl")
    unet = c.unet.config
    assert unet.down_block_types == ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
    assert unet.layers_per_block == 2 and len(unet.block_out_channels) == 3  # nine input blocks
    assert unet.addition_embed_type == "text_time"
    assert unet.projection_class_embeddings_input_dim == c.text_encoder_2.config.projection_dim + 6 * 8
    assert unet.cross_attention_dim == c.text_encoder.config.hidden_size + c.text_encoder_2.config.hidden_size
    assert type(c.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert (c.text_encoder.config.hidden_act, c.text_encoder_2.config.hidden_act) == ("quick_gelu", "gelu")
    assert c.vae.config.scaling_factor == 0.13025


@pytest.mark.parametrize("which", ["sdxl", "sdxl-diffusers"])
def test_tiny_sdxl_loads_with_both_encoders_and_tokenizers(tiny_models, which):
    model = load_model(str(tiny_models[which]))
    assert model.kind == ModelKind("sdxl", False)
    assert type(model.text_encoder).__name__ == "CLIPTextModel"
    assert type(model.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert (model.tokenizer.pad_token_id, model.tokenizer_2.pad_token_id) == (49407, 0)
    assert model.tokenizer_2("wow!!!").input_ids == [49406, 2781, 995, 49407]
    assert model.vae.config.scaling_factor == 0.13025


def test_single_file_and_folder_hold_identical_weights(tiny_models):
    single, folder = load_model(str(tiny_models["sdxl"])), load_model(str(tiny_models["sdxl-diffusers"]))
    for part in ("text_encoder", "text_encoder_2", "unet", "vae"):
        a, b = getattr(single, part).state_dict(), getattr(folder, part).state_dict()
        assert sorted(a) == sorted(b), part
        assert all(torch.equal(a[k], b[k]) for k in a), part


def test_family_flags_name_the_kind_found(tiny_models):
    cases = {
        ("sdxl", "v1"): r"^--v1 was given but tiny-sdxl\.safetensors is an SDXL model "
                        r"\(CLIP ViT-L \+ OpenCLIP ViT-bigG text encoders\); remove --v1$",
        ("sdxl", "v2"): r"^--v2 was given but tiny-sdxl\.safetensors is an SDXL model",
        ("sd1", "sdxl"): r"^--sdxl was given but tiny-sd1\.safetensors is an SD 1\.x model "
                         r"\(CLIP ViT-L text encoder\); remove --sdxl$",
        ("sd2", "sdxl"): r"^--sdxl was given but tiny-sd2\.safetensors is an SD 2\.x model",
    }
    for (kind, flag), pattern in cases.items():
        with pytest.raises(UserError, match=pattern):
            load_model(str(tiny_models[kind]), **{flag: True})
    assert load_model(str(tiny_models["sdxl"]), sdxl=True).kind.family == "sdxl"
    with pytest.raises(UserError, match="^--v2 and --sdxl contradict each other; give at most one$"):
        load_model(str(tiny_models["sdxl"]), v2=True, sdxl=True)
