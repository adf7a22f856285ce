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


def test_sdxl_vae_runs_in_fp32_when_the_run_is_fp16_with_one_log_line(tiny_models, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="library.models.loader"):
        half = load_model(str(tiny_models["sdxl"]), dtype=torch.float16)
    assert (half.unet.dtype, half.vae.dtype, half.text_encoder_2.dtype) == (torch.float16, torch.float32, torch.float16)
    notes = [r.getMessage() for r in caplog.records if "overflows in float16" in r.getMessage()]
    assert notes == ["SDXL's VAE overflows in float16 (NaN or black images): it runs in float32"]
    assert load_model(str(tiny_models["sdxl"]), dtype=torch.bfloat16).vae.dtype == torch.bfloat16
    assert load_model(str(tiny_models["sdxl-diffusers"]), dtype=torch.float16).vae.dtype == torch.float32
    assert load_model(str(tiny_models["sd1"]), dtype=torch.float16).vae.dtype == torch.float16


def test_separate_vae_on_sdxl_takes_sdxl_scale_and_fp32_in_fp16_runs(tiny_models):
    from library.models.loader import load_vae

    model = load_model(str(tiny_models["sdxl"]), vae=str(tiny_models["vae"]), dtype=torch.float16)
    assert (model.vae.config.scaling_factor, model.vae.dtype) == (0.13025, torch.float32)
    expected = load_vae(str(tiny_models["vae"]), torch.float32).state_dict()
    assert all(torch.equal(model.vae.state_dict()[k], v) for k, v in expected.items())


def test_v_pred_key_marks_an_sdxl_file_as_v_prediction(tiny_models, tmp_path):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(tiny_models["sdxl"]))
    save_file({**tensors, "v_pred": torch.tensor(1)}, str(tmp_path / "xl-v.safetensors"))
    assert load_model(str(tmp_path / "xl-v.safetensors")).kind == ModelKind("sdxl", True)


def test_full_size_sdxl_layout_is_detected_as_sdxl_base():
    """Stability AI's SDXL base layout, built on the meta device: every config value that matters."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from library.models.detect import detect_model
    from library.models.ldm_export import to_ldm_checkpoint
    from tests.helpers import CLIP_L, SD_VAE, SDXL_UNET, OPENCLIP_BIGG

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET)
        vae = AutoencoderKL(**dict(SD_VAE, scaling_factor=0.13025))
        te1 = CLIPTextModel(CLIPTextConfig(**CLIP_L))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**OPENCLIP_BIGG))
    ckpt = to_ldm_checkpoint(unet.state_dict(), vae.state_dict(), te1.state_dict(), dict(unet.config), "sdxl",
                             te2.state_dict())
    assert "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight" in ckpt
    assert tuple(ckpt["model.diffusion_model.label_emb.0.0.weight"].shape) == (1280, 2816)
    spec = detect_model({k: tuple(v.shape) for k, v in ckpt.items()})
    assert spec.family == "sdxl"
    assert {k: spec.unet[k] for k in SDXL_UNET} == SDXL_UNET
    assert {k: spec.text_encoder[k] for k in CLIP_L} == CLIP_L
    assert {k: spec.text_encoder_2[k] for k in OPENCLIP_BIGG} == OPENCLIP_BIGG
    assert spec.vae["scaling_factor"] == 0.13025
