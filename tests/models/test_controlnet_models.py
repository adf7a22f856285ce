"""Loading ControlNet files (`library.models.controlnet.load_controlnet`): layouts and errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from library.errors import UserError
from library.models import checkpoint
from library.models.controlnet import load_controlnet
from library.models.ldm_export import controlnet_to_ldm
from library.models.loader import _empty_modules
from library.models.tiny import TINY_HINT_CHANNELS, build_tiny_components, tiny_controlnet

OPTION = "--control_net_models"


@pytest.fixture(scope="module")
def unets() -> dict[str, torch.nn.Module]:
    """The tiny SD1 and SD2 U-Nets the tiny ControlNets were made from (seed 0)."""
    return {kind: build_tiny_components(kind, seed=0).unet for kind in ("sd1", "sd2")}


def _residuals(controlnet, width: int) -> list[torch.Tensor]:
    """Down-block residuals and the mid-block residual on fixed inputs (64x64 hint image)."""
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 8, 8, generator=g)
    text = torch.randn(1, 77, width, generator=g)
    hint = torch.rand(1, 3, 64, 64, generator=g)
    with torch.no_grad():
        down, mid = controlnet(sample, torch.tensor(500), text, hint, return_dict=False)
    return [t.float() for t in (*down, mid)]


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    assert len(a) == len(b)
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def _load(path: Path | str, unet, dtype=torch.float32):
    return load_controlnet(str(path), unet, dtype, "cpu")


def test_single_file_folder_and_difference_file_are_the_same_network(tiny_models, unets, caplog):
    unet = unets["sd1"]
    single = _residuals(_load(tiny_models["controlnet-sd1"], unet), 32)
    folder = _residuals(_load(tiny_models["controlnet-sd1-diffusers"], unet), 32)
    with caplog.at_level("INFO", logger="library.models.controlnet"):
        diff = _residuals(_load(tiny_models["controlnet-sd1-diff"], unet), 32)
    assert len(single) == 5  # conv_in + 2 layers + 1 downsampler, then 1 layer: 4 down residuals, 1 mid
    assert _max_diff(single, folder) < 1e-5
    assert _max_diff(single, diff) < 1e-5
    assert "tiny-controlnet-sd1-diff.safetensors is a difference ControlNet" in caplog.text


def test_residuals_are_not_zero(tiny_models, unets):
    residuals = _residuals(_load(tiny_models["controlnet-sd1"], unets["sd1"]), 32)
    assert [tuple(r.shape) for r in residuals] == [
        (1, 32, 8, 8), (1, 32, 8, 8), (1, 32, 4, 4), (1, 64, 4, 4), (1, 64, 4, 4)
    ]
    assert min(r.abs().mean().item() for r in residuals) > 0.05
    assert all(torch.isfinite(r).all() for r in residuals)


def test_difference_file_is_really_a_difference(tiny_models, unets):
    """Without the U-Net added back its shared weights are far from the full file's."""
    full, diff = load_file(tiny_models["controlnet-sd1"]), load_file(tiny_models["controlnet-sd1-diff"])
    key = "control_model.input_blocks.1.0.in_layers.2.weight"
    unet_weight = unets["sd1"].state_dict()["down_blocks.0.resnets.0.conv1.weight"]
    assert diff["difference"].ndim == 0
    assert torch.allclose(diff[key] + unet_weight, full[key], atol=1e-6)
    assert (diff[key] - full[key]).abs().max().item() > 0.1
    hint = "control_model.input_hint_block.0.weight"  # not in the U-Net: stored as is
    assert torch.equal(diff[hint], full[hint])


def test_export_round_trip_is_bitwise(tmp_path, unets):
    original = tiny_controlnet(unets["sd1"], seed=3)
    path = tmp_path / "cn.safetensors"
    save_file(controlnet_to_ldm(original.state_dict(), original.config), path)
    loaded = _load(path, unets["sd1"])
    assert tuple(loaded.config.conditioning_embedding_out_channels) == TINY_HINT_CHANNELS
    assert loaded.config.conditioning_channels == 3
    ours, theirs = loaded.state_dict(), original.state_dict()
    assert sorted(ours) == sorted(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_prefixless_and_pickle_files_load_the_same(tmp_path, tiny_models, unets):
    unet = unets["sd1"]
    sd = load_file(tiny_models["controlnet-sd1"])
    bare = {k.removeprefix("control_model."): v for k, v in sd.items()}
    assert len(bare) == len(sd) and not any(k.startswith("control_model.") for k in bare)
    save_file(bare, tmp_path / "bare.safetensors")
    torch.save({"state_dict": sd}, tmp_path / "cn.pth")
    reference = _residuals(_load(tiny_models["controlnet-sd1"], unet), 32)
    assert _max_diff(reference, _residuals(_load(tmp_path / "bare.safetensors", unet), 32)) == 0
    assert _max_diff(reference, _residuals(_load(tmp_path / "cn.pth", unet), 32)) == 0


def test_linear_attention_projections_are_reshaped_to_convs(tmp_path, tiny_models, unets):
    """SD1 models use 1x1-conv proj_in/out; a file with linear ones loads the same."""
    sd = load_file(tiny_models["controlnet-sd1"])
    linear = {k: v.flatten(1) if k.endswith(("proj_in.weight", "proj_out.weight")) else v for k, v in sd.items()}
    assert sum(v.ndim == 2 and "proj_" in k for k, v in linear.items()) == 4
    save_file(linear, tmp_path / "linear.safetensors")
    unet = unets["sd1"]
    reference = _residuals(_load(tiny_models["controlnet-sd1"], unet), 32)
    assert _max_diff(reference, _residuals(_load(tmp_path / "linear.safetensors", unet), 32)) == 0


def test_bfloat16_and_eval_mode(tiny_models, unets):
    for name in ("controlnet-sd1", "controlnet-sd1-diffusers", "controlnet-sd1-diff"):
        controlnet = _load(tiny_models[name], unets["sd1"], torch.bfloat16)
        assert {p.dtype for p in controlnet.parameters()} == {torch.bfloat16}
        assert not controlnet.training
        assert not any(p.requires_grad for p in controlnet.parameters())
        assert torch.isfinite(_residuals(controlnet.float(), 32)[-1]).all()


def test_sd2_controlnet_loads_with_the_sd2_unet(tiny_models, unets):
    controlnet = _load(tiny_models["controlnet-sd2"], unets["sd2"])
    assert controlnet.config.cross_attention_dim == 64
    assert controlnet.config.use_linear_projection is True
    assert min(r.abs().mean().item() for r in _residuals(controlnet, 64)) > 0.05


@pytest.mark.parametrize(
    "family,unet_kwargs",
    [
        ("sd1", dict(cross_attention_dim=768, attention_head_dim=8)),
        ("sd2", dict(cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True)),
    ],
)
def test_full_size_layouts_on_meta_tensors(tmp_path, monkeypatch, family, unet_kwargs):
    """Real-size SD 1.5 / 2.1 ControlNet key layouts, with no weights: hint widths and shapes."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    with _empty_modules():
        unet = UNet2DConditionModel(block_out_channels=(320, 640, 1280, 1280), **unet_kwargs)
        reference = ControlNetModel.from_unet(unet, load_weights_from_unet=False)
    ldm = controlnet_to_ldm(reference.state_dict(), reference.config)
    assert tuple(ldm["control_model.input_hint_block.14.weight"].shape) == (320, 256, 3, 3)
    assert tuple(ldm["control_model.zero_convs.11.0.weight"].shape) == (1280, 1280, 1, 1)
    path = tmp_path / f"control_{family}.safetensors"
    path.touch()
    monkeypatch.setattr(checkpoint, "read_state_dict", lambda p: ldm if p == path else {})
    loaded = load_controlnet(str(path), unet, torch.float16, "meta")
    assert tuple(loaded.config.conditioning_embedding_out_channels) == (16, 32, 96, 256)
    ours, theirs = loaded.state_dict(), reference.state_dict()
    assert sorted(ours) == sorted(theirs)
    assert all(ours[k].shape == theirs[k].shape and ours[k].dtype == torch.float16 for k in ours)


# --- errors -------------------------------------------------------------------------------


def _error(spec: Path | str, unet) -> str:
    with pytest.raises(UserError) as info:
        _load(spec, unet)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_file(tmp_path, unets):
    path = tmp_path / "nothing.safetensors"
    assert _error(path, unets["sd1"]) == f"{OPTION} {path}: no such file or folder"


@pytest.mark.parametrize("name", ["vae", "sd1"])
def test_not_a_controlnet(tiny_models, unets, name):
    assert _error(tiny_models[name], unets["sd1"]) == (
        f"{OPTION} {tiny_models[name]}: not a ControlNet model (no input_hint_block weights); "
        "pass a ControlNet 1.0 .safetensors or a Diffusers ControlNet folder"
    )


def test_model_folder_is_not_a_controlnet_folder(tiny_models, unets):
    folder = tiny_models["sd1-diffusers"]
    assert _error(folder, unets["sd1"]) == (
        f"{OPTION} {folder}: folder has no config.json; not a Diffusers ControlNet, "
        "pass a ControlNet 1.0 .safetensors or a Diffusers ControlNet folder"
    )
    assert _error(folder / "unet", unets["sd1"]) == (
        f"{OPTION} {folder / 'unet'}: the folder holds a UNet2DConditionModel, not a ControlNetModel; "
        "pass a ControlNet 1.0 .safetensors or a Diffusers ControlNet folder"
    )


def test_sd2_controlnet_with_sd1_unet(tiny_models, unets):
    path = tiny_models["controlnet-sd2"]
    assert _error(path, unets["sd1"]) == (
        f"{OPTION} {path}: this ControlNet does not fit the model (cross-attention width 64, "
        "the model's is 32); use a ControlNet made for models of cross-attention width 32"
    )


def test_sd1_controlnet_folder_with_sd2_unet(tiny_models, unets):
    path = tiny_models["controlnet-sd1-diffusers"]
    assert _error(path, unets["sd2"]) == (
        f"{OPTION} {path}: this ControlNet does not fit the model (cross-attention width 32, "
        "the model's is 64); use a ControlNet made for models of cross-attention width 64"
    )


def test_real_widths_name_the_family():
    """With SD-sized widths the message names the family the model needs."""
    from library.models import controlnet as module

    assert module._family(768) == "SD 1.x models"
    assert module._family(1024) == "SD 2.x models"


def test_channel_mismatch_names_both_widths(tmp_path, tiny_models, unets):
    sd = load_file(tiny_models["controlnet-sd1"])
    wider = dict(sd)
    wider["control_model.input_blocks.0.0.weight"] = torch.zeros(48, 4, 3, 3)
    save_file(wider, tmp_path / "wide.safetensors")
    assert _error(tmp_path / "wide.safetensors", unets["sd1"]) == (
        f"{OPTION} {tmp_path / 'wide.safetensors'}: this ControlNet does not fit the model (base channel "
        "width 48, the model's is 32); use a ControlNet made for models of cross-attention width 32"
    )
    odd = dict(sd)
    odd["control_model.zero_convs.1.0.weight"] = torch.zeros(32, 16, 1, 1)
    save_file(odd, tmp_path / "odd.safetensors")
    assert _error(tmp_path / "odd.safetensors", unets["sd1"]) == (
        f"{OPTION} {tmp_path / 'odd.safetensors'}: this ControlNet does not fit the model "
        "(controlnet_down_blocks.1.weight has shape (32, 16, 1, 1), the model's is (32, 32, 1, 1)); "
        "use a ControlNet made for models of cross-attention width 32"
    )


def test_incomplete_controlnet(tmp_path, tiny_models, unets):
    sd = {k: v for k, v in load_file(tiny_models["controlnet-sd1"]).items() if "zero_convs.2." not in k}
    path = tmp_path / "partial.safetensors"
    save_file(sd, path)
    assert _error(path, unets["sd1"]) == (
        f"{OPTION} {path}: ControlNet is incomplete: 2 tensors missing (e.g. controlnet_down_blocks.2.bias)"
    )
