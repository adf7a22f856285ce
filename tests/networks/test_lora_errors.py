"""User mistakes with LoRA files end in one UserError line naming the file and the fix."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from library.errors import UserError
from networks.lora import create_network_from_weights
from networks.lora_files import write_kohya_lora
from tests.helpers import assert_same_weights, fresh, weights


class NotATensor:
    """A class a weights-only unpickler must refuse."""


def _load(path, c):
    return create_network_from_weights(1.0, path, None, c.text_encoder, c.unet)


def test_sd2_lora_on_sd1_model(tmp_path):
    sd2, sd1 = fresh("sd2"), fresh("sd1")
    path = tmp_path / "sd2.safetensors"
    write_kohya_lora(path, sd2.text_encoder, sd2.unet, rank=4)
    before = weights(sd1.unet, sd1.text_encoder)
    with pytest.raises(UserError) as info:
        _load(path, sd1)
    assert str(info.value) == (
        f"LoRA file {path} is for a different base model: layer "
        "lora_te_text_model_encoder_layers_0_mlp_fc1 has weight [64, 32] but the file's "
        "lora_up (128, 4) / lora_down (4, 64) does not fit it; use a LoRA trained for this model "
        "(SD1.x and SD2.x LoRAs are not interchangeable)"
    )
    assert_same_weights(before, sd1.unet, sd1.text_encoder)


def test_sd2_unet_only_lora_on_sd1_model(tmp_path):
    sd2, sd1 = fresh("sd2"), fresh("sd1")
    path = tmp_path / "sd2-unet.safetensors"
    write_kohya_lora(path, None, sd2.unet, rank=4)
    with pytest.raises(UserError) as info:
        _load(path, sd1)
    assert str(info.value) == (
        f"LoRA file {path} is for a different base model: layer "
        "lora_unet_down_blocks_0_attentions_0_proj_in has weight [32, 32, 1, 1] but the file's "
        "lora_up (64, 4, 1, 1) / lora_down (4, 64, 1, 1) does not fit it; use a LoRA trained for "
        "this model (SD1.x and SD2.x LoRAs are not interchangeable)"
    )


def test_lora_of_another_architecture_names_no_layer(tmp_path):
    c = fresh("sd1")
    path = tmp_path / "sdxl.safetensors"
    save_file(
        {
            "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 768),
            "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(3072, 4),
            "lora_te1_text_model_encoder_layers_0_mlp_fc1.alpha": torch.tensor(4.0),
        },
        str(path),
    )
    with pytest.raises(UserError) as info:
        _load(path, c)
    assert str(info.value) == (
        f"LoRA file {path} is for a different base model: none of its 3 LoRA keys names a layer "
        "of this model (SDXL or another architecture?); use a LoRA trained for this model"
    )


def test_file_without_lora_keys(tmp_path):
    c = fresh("sd1")
    path = tmp_path / "embedding.safetensors"
    save_file({"emb_params": torch.zeros(2, 768)}, str(path))
    with pytest.raises(UserError) as info:
        _load(path, c)
    assert str(info.value) == (
        f"LoRA file {path} contains no LoRA weights (no lora_down/lora_up, lora_A/lora_B, LoHa or "
        "LoKr keys); pass a LoRA file to --network_weights"
    )


def test_corrupt_safetensors(tmp_path):
    c = fresh("sd1")
    path = tmp_path / "broken.safetensors"
    good = tmp_path / "good.safetensors"
    write_kohya_lora(good, c.text_encoder, c.unet)
    path.write_bytes(good.read_bytes()[:500])  # truncated download
    with pytest.raises(UserError) as info:
        _load(path, c)
    message = str(info.value)
    assert message.startswith(f"cannot read LoRA file {path}: it is damaged or not a weights file (")
    assert message.endswith("); re-download it or pass another file to --network_weights")
    assert "\n" not in message


def test_corrupt_ckpt(tmp_path):
    c = fresh("sd1")
    path = tmp_path / "broken.ckpt"
    path.write_bytes(b"this is not a pickle at all")
    with pytest.raises(UserError) as info:
        _load(path, c)
    assert str(info.value) == (
        f"cannot read LoRA file {path}: it is damaged or not a weights file (pop from empty list); "
        "re-download it or pass another file to --network_weights"
    )


def test_pickle_needing_code_is_refused(tmp_path):
    c = fresh("sd1")
    path = tmp_path / "evil.pt"
    torch.save({"lora_unet_x.lora_down.weight": torch.zeros(1), "payload": NotATensor()}, path)
    with pytest.raises(UserError) as info:
        _load(path, c)
    assert str(info.value) == (
        f"LoRA file {path} needs arbitrary code to load and was refused (only plain tensors are "
        "read from .ckpt/.pt files); convert it to .safetensors"
    )


def test_missing_file(tmp_path):
    c = fresh("sd1")
    path = tmp_path / "nope.safetensors"
    with pytest.raises(UserError) as info:
        _load(path, c)
    assert str(info.value) == f"LoRA file not found: {path}; check the path given to --network_weights"


def test_ckpt_holding_a_list_is_rejected(tmp_path):
    c = fresh("sd1")
    path = tmp_path / "list.ckpt"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(UserError) as info:
        _load(path, c)
    assert str(info.value) == (
        f"cannot read LoRA file {path}: it is damaged or not a weights file (top-level object is list, "
        "not a dict); re-download it or pass another file to --network_weights"
    )
