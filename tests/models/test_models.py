"""Loading every layout of the tiny models; errors for bad input."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from library.errors import UserError
from library.models import load_model
from library.models.loader import text_model

KINDS = ["sd1", "sd2", "sd2-v", "sdxl"]


def _outputs(model) -> dict[str, torch.Tensor]:
    """Text-encoder hidden states (SDXL: both encoders', and bigG's pooled projection), U-Net
    and VAE outputs on fixed inputs."""
    g = torch.Generator().manual_seed(0)
    ids = torch.tensor([[49406, 320, 1125, 539, 320, 2368, 49407] + [model.tokenizer.pad_token_id] * 70])
    x = torch.randn(1, 4, 8, 8, generator=g)
    h = torch.randn(1, 77, model.unet.config.cross_attention_dim, generator=g)
    added = None
    if model.text_encoder_2 is not None:
        width = model.unet.config.projection_class_embeddings_input_dim
        pooled = model.text_encoder_2.config.projection_dim
        added = {"text_embeds": torch.randn(1, pooled, generator=g),
                 "time_ids": torch.rand(1, (width - pooled) // model.unet.config.addition_time_embed_dim, generator=g) * 1024}
    with torch.no_grad():
        hidden = model.text_encoder(ids, output_hidden_states=True).hidden_states
        out = {
            "te": torch.stack(hidden),
            "unet": model.unet(x, 500, h, added_cond_kwargs=added).sample,
            "vae_dec": model.vae.decode(x).sample,
            "vae_enc": model.vae.encode(torch.rand(1, 3, 32, 32, generator=g) * 2 - 1).latent_dist.mean,
        }
        if model.text_encoder_2 is not None:
            te2 = model.text_encoder_2(ids, output_hidden_states=True)
            out.update(te2=torch.stack(te2.hidden_states), pooled=te2.text_embeds)
        return out


def _max_diff(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.parametrize("kind", KINDS)
def test_single_file_and_diffusers_folder_give_the_same_networks(tiny_models, kind):
    single = load_model(str(tiny_models[kind]))
    folder = load_model(str(tiny_models[f"{kind}-diffusers"]))
    assert single.kind == folder.kind
    assert _max_diff(_outputs(single), _outputs(folder)) < 1e-5


def test_folder_load_prints_no_progress_bar(tiny_models, capsys):
    from transformers.utils import logging as hf_logging

    load_model(str(tiny_models["sd1-diffusers"]))
    captured = capsys.readouterr()
    assert "Loading weights" not in captured.err + captured.out
    assert hf_logging.is_progress_bar_enabled()  # switched off only while loading


@pytest.mark.parametrize("kind,family,v", [("sd1", "sd1", False), ("sd2", "sd2", False), ("sd2-v", "sd2", True),
                                           ("sdxl", "sdxl", False)])
def test_kind_is_detected_without_flags(tiny_models, kind, family, v):
    for path in (tiny_models[kind], tiny_models[f"{kind}-diffusers"]):
        model = load_model(str(path))
        assert (model.kind.family, model.kind.v_prediction) == (family, v)
        assert model.kind.default_clip_skip == (1 if family == "sd1" else 2)
        assert (model.text_encoder_2 is None, model.tokenizer_2 is None) == (family != "sdxl",) * 2


def test_v_parameterization_flag_wins_and_yaml_beside_file_is_read(tiny_models, tmp_path):
    assert load_model(str(tiny_models["sd2"]), v_parameterization=True).kind.v_prediction
    copy = tmp_path / "model.safetensors"
    copy.symlink_to(tiny_models["sd2"])
    (tmp_path / "model.yaml").write_text('model:\n  params:\n    parameterization: "v"\n')
    assert load_model(str(copy)).kind.v_prediction


def test_wrong_family_flags_are_errors_that_name_the_mismatch(tiny_models):
    with pytest.raises(UserError, match=r"--v2 was given but tiny-sd1\.safetensors is an SD 1\.x model"):
        load_model(str(tiny_models["sd1"]), v2=True)
    with pytest.raises(UserError, match=r"--v1 was given but tiny-sd2\.safetensors is an SD 2\.x model"):
        load_model(str(tiny_models["sd2"]), v1=True)
    assert load_model(str(tiny_models["sd2"]), v2=True).kind.family == "sd2"


def test_ckpt_prefixless_fp16_and_bf16_files_load_like_the_original(tiny_models, tmp_path):
    reference = _outputs(load_model(str(tiny_models["sd1"])))
    sd = load_file(str(tiny_models["sd1"]))
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": sd, "global_step": 10}, ckpt)
    assert _max_diff(_outputs(load_model(str(ckpt))), reference) < 1e-5

    bare = {k.removeprefix("model.").removeprefix("cond_stage_model."): v for k, v in sd.items()}
    save_file(bare, str(tmp_path / "bare.safetensors"))
    assert _max_diff(_outputs(load_model(str(tmp_path / "bare.safetensors"))), reference) < 1e-5

    for dtype, tol in ((torch.float16, 2e-2), (torch.bfloat16, 1e-1)):
        path = tmp_path / f"{dtype}.safetensors"
        save_file({k: v.to(dtype) for k, v in sd.items()}, str(path))
        model = load_model(str(path))  # stored half, run in fp32
        assert model.unet.dtype == torch.float32
        assert _max_diff(_outputs(model), reference) < tol


def test_glob_and_symlink_resolve(tiny_models, tmp_path):
    link = tmp_path / "link.safetensors"
    link.symlink_to(tiny_models["sd1"])
    assert load_model(str(link)).kind.family == "sd1"
    pattern = str(tiny_models["sd1"].parent / "tiny-sd1.safe*")
    assert load_model(pattern).kind.family == "sd1"
    with pytest.raises(UserError, match="must match exactly one file"):
        load_model(str(tiny_models["sd1"].parent / "tiny-*.safetensors"))


def test_dtype_and_half_storage_without_copy(tiny_models, tmp_path):
    model = load_model(str(tiny_models["sd1"]), dtype=torch.bfloat16, vae_dtype=torch.float32)
    assert model.unet.dtype == torch.bfloat16 and model.text_encoder.dtype == torch.bfloat16
    assert model.vae.dtype == torch.float32


def test_separate_vae_single_file_prefixed_and_folder(tiny_models, tmp_path):
    from library.models import load_vae

    vae = load_vae(str(tiny_models["vae"]), torch.float32)
    prefixless = tmp_path / "vae.safetensors"
    save_file({k.removeprefix("first_stage_model."): v for k, v in load_file(str(tiny_models["vae"])).items()},
              str(prefixless))
    vae2 = load_vae(str(prefixless), torch.float32)
    vae.save_pretrained(tmp_path / "vae_folder")
    vae3 = load_vae(str(tmp_path / "vae_folder"), torch.float32)
    x = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        a, b, c = (v.decode(x).sample for v in (vae, vae2, vae3))
    assert torch.equal(a, b) and (a - c).abs().max() < 1e-5
    model = load_model(str(tiny_models["sd1"]), vae=str(tiny_models["vae"]))
    with torch.no_grad():
        assert torch.equal(model.vae.decode(x).sample, a)
    base = load_model(str(tiny_models["sd1"]))
    with torch.no_grad():
        assert not torch.equal(base.vae.decode(x).sample, a)


def test_with_vae_the_checkpoints_own_vae_is_never_built(tiny_models, tmp_path, monkeypatch):
    """--vae replaces the checkpoint's VAE: its weights are neither converted nor assigned
    (no time, no memory), in a single file and in a Diffusers folder, which then needs no vae/."""
    import shutil

    from library.models import loader
    from library.models.loader import load_vae

    assigned = []
    real_assign = loader._assign
    monkeypatch.setattr(loader, "_assign", lambda module, state, dtype, what, pages=None: (
        assigned.append(what), real_assign(module, state, dtype, what, pages))[1])
    load_model(str(tiny_models["sd1"]), vae=str(tiny_models["vae"]))
    assert [w.rsplit(": ", 1)[-1] for w in assigned] == ["U-Net", "text encoder", "--vae " + str(tiny_models["vae"])]
    assigned.clear()
    load_model(str(tiny_models["sd1"]))
    assert [w.rsplit(": ", 1)[-1] for w in assigned] == ["U-Net", "VAE", "text encoder"]
    folder = tmp_path / "no-vae"
    shutil.copytree(tiny_models["sd1-diffusers"], folder)
    shutil.rmtree(folder / "vae")
    model = load_model(str(folder), vae=str(tiny_models["vae"]))
    x = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        assert torch.equal(model.vae.decode(x).sample, load_vae(str(tiny_models["vae"]), torch.float32).decode(x).sample)


class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": {"x": _Evil(str(marker))}}, f)
    torch.save({"state_dict": {"x": _Evil(str(marker))}}, tmp_path / "evil2.ckpt")
    assert not marker.exists()
    for p in (path, tmp_path / "evil2.ckpt"):
        with pytest.raises(UserError, match=r"refused to load.*convert it to \.safetensors"):
            load_model(str(p))
    assert not marker.exists()


def test_bad_inputs_are_one_line_user_errors(tiny_models, tmp_path):
    data = tiny_models["sd1"].read_bytes()
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    (tmp_path / "empty_dir").mkdir()
    not_sd = tmp_path / "other.safetensors"
    save_file({"foo.weight": torch.zeros(2)}, str(not_sd))
    cases = {
        str(truncated): r"cut\.safetensors: not a readable safetensors file",
        str(tmp_path / "empty_dir"): r"not a Diffusers model folder",
        str(tmp_path / "missing.safetensors"): r"missing\.safetensors: no such file or folder",
        "nobody/no-such-model": r"nobody/no-such-model: no such file or folder, and not in the local Hugging Face cache",
        "nobody/model.safetensors": r"nobody/model\.safetensors: no such file or folder$",
        str(not_sd): r"other\.safetensors: not a Stable Diffusion 1\.x/2\.x/XL checkpoint",
    }
    for ckpt, pattern in cases.items():
        with pytest.raises(UserError, match=pattern) as info:
            load_model(ckpt)
        assert "\n" not in str(info.value)


def test_hf_id_resolves_from_local_cache(tiny_models, tmp_path, monkeypatch):
    import shutil

    snapshot = tmp_path / "hub" / "models--someone--tiny" / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_models["sd1-diffusers"], snapshot)
    (tmp_path / "hub" / "models--someone--tiny" / "refs").mkdir()
    (tmp_path / "hub" / "models--someone--tiny" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    model = load_model("someone/tiny")
    assert model.kind.family == "sd1" and Path(model.path) == snapshot.resolve()


def test_sd2_text_encoder_drops_the_unused_last_block(tiny_models):
    from safetensors import safe_open

    with safe_open(str(tiny_models["sd2"]), "pt") as f:
        blocks = {k.split(".")[4] for k in f.keys() if ".resblocks." in k}
    model = load_model(str(tiny_models["sd2"]))
    assert len(text_model(model.text_encoder).encoder.layers) == len(blocks) - 1


@pytest.mark.parametrize("kind", KINDS)
def test_convert_model_round_trips_both_ways(tiny_models, tmp_path, kind):
    from tools.convert_model import main

    assert main([str(tiny_models[kind]), str(tmp_path / "folder")]) == 0
    assert main([str(tmp_path / "folder"), str(tmp_path / "back.safetensors")]) == 0
    reference = load_model(str(tiny_models[kind]))
    for path in (tmp_path / "folder", tmp_path / "back.safetensors"):
        converted = load_model(str(path))
        assert converted.kind == reference.kind
        assert _max_diff(_outputs(converted), _outputs(reference)) < 1e-5
    assert main([str(tiny_models[kind]), str(tmp_path / "half.safetensors"), "--fp16"]) == 0
    assert {v.dtype for v in load_file(str(tmp_path / "half.safetensors")).values() if v.is_floating_point()} == {
        torch.float16
    }


def test_convert_model_bad_source_is_exit_2(tmp_path, capsys):
    from tools.convert_model import main

    assert main([str(tmp_path / "nope.ckpt"), str(tmp_path / "x")]) == 2
    assert "no such file or folder" in capsys.readouterr().err
