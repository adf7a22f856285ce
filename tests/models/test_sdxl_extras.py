"""SDXL embeddings (clip_l + clip_g) and the header checks that refuse SDXL files with SD 1.x/2.x
checkpoints (and the reverse) before any model loads."""

from __future__ import annotations

import pytest
import torch

from library.errors import UserError
from library.models.family_headers import checkpoint_family, embedding_generation, lora_generation
from library.models.loader import text_model
from library.text.embeddings import load_embeddings, write_embedding, write_sdxl_embedding
from tests.helpers import run


def test_headers_tell_the_family_of_checkpoints_loras_and_embeddings(tiny_models):
    assert [checkpoint_family(tiny_models[k]) for k in ("sd1", "sd2", "sdxl", "sdxl-diffusers", "sd1-diffusers")] == [
        "sd1", "sd2", "sdxl", "sdxl", "sd1"]
    assert (lora_generation(tiny_models["lora"]), lora_generation(tiny_models["lora-sdxl"])) == ("sd", "sdxl")
    assert (embedding_generation(tiny_models["embedding"]),
            embedding_generation(tiny_models["embedding-sdxl"])) == ("sd", "sdxl")


def test_sdxl_embedding_changes_both_encoders_inputs_exactly(tiny_models):
    from library.models import load_model

    model = load_model(str(tiny_models["sdxl"]))
    te1, te2 = model.text_encoder, model.text_encoder_2
    embeddings = load_embeddings([str(tiny_models["embedding-sdxl"])], [], te1, model.unet, text_encoder_2=te2)
    from safetensors.torch import load_file

    stored = load_file(str(tiny_models["embedding-sdxl"]))
    parts = embeddings.split("a goodxl cat")
    assert parts[0] == "a " and parts[2] == " cat" and parts[1] == (49408, 49409)
    assert embeddings.for_encoder(1).split("a goodxl cat") == parts  # same words, same ids
    ids = torch.tensor([[49406, 320, 49408, 49409, 2368, 49407]])
    keep = [0, 1, 4, 5]
    plain = {i: text_model(te).embeddings.token_embedding(ids[:, keep]) for i, te in ((1, te1), (2, te2))}
    with embeddings.installed(te1):
        first = text_model(te1).embeddings.token_embedding(ids)
    with embeddings.for_encoder(1).installed(te2):
        second = text_model(te2).embeddings.token_embedding(ids)
    assert torch.equal(first[0, 2:4], stored["clip_l"]) and torch.equal(second[0, 2:4], stored["clip_g"])
    assert torch.equal(first[:, keep], plain[1]) and torch.equal(second[:, keep], plain[2])


def test_embedding_of_the_wrong_generation_is_one_line(tiny_models, tmp_path):
    from library.models.tiny import build_tiny_components

    c = build_tiny_components("sdxl")
    sd1_file = write_embedding(tmp_path / "old.safetensors", torch.zeros(1, 32))
    with pytest.raises(UserError, match=r"old\.safetensors: not an SDXL embedding \(no clip_l and clip_g tensors\)"):
        load_embeddings([str(sd1_file)], [], c.text_encoder, c.unet, text_encoder_2=c.text_encoder_2)
    bad = write_sdxl_embedding(tmp_path / "bad.safetensors", torch.zeros(2, 32), torch.zeros(3, 64))
    with pytest.raises(UserError, match=r"bad\.safetensors: clip_l holds 2 vectors but clip_g 3"):
        load_embeddings([str(bad)], [], c.text_encoder, c.unet, text_encoder_2=c.text_encoder_2)
    with pytest.raises(UserError, match=r"^--XTI_embeddings x\.safetensors: XTI embeddings work with SD 1\.x/2\.x "
                                         r"only, not SDXL$"):
        load_embeddings([], ["x.safetensors"], c.text_encoder, c.unet, text_encoder_2=c.text_encoder_2)


@pytest.mark.parametrize("kind,option,extra,message", [
    ("sd1", "--network_module", "lora-sdxl",
     "--network_weights {path}: an SDXL LoRA, but --ckpt {ckpt} is an SD 1.x model; use a LoRA made for SD 1.x/2.x"),
    ("sdxl", "--network_module", "lora",
     "--network_weights {path}: an SD 1.x/2.x LoRA, but --ckpt {ckpt} is an SDXL model; use a LoRA made for SDXL"),
    ("sdxl", "--textual_inversion_embeddings", "embedding",
     "--textual_inversion_embeddings {path}: an SD 1.x/2.x embedding, but --ckpt {ckpt} is an SDXL model; "
     "use an embedding made for SDXL"),
])
def test_wrong_generation_files_stop_the_run_before_loading(tiny_models, tmp_path, capsys, monkeypatch,
                                                            kind, option, extra, message):
    import library.models.loader as loader

    monkeypatch.setattr(loader, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    path = str(tiny_models[extra])
    args = ["--network_module", "networks.lora", "--network_weights", path] if option == "--network_module" else [
        option, path]
    assert run(tiny_models, tmp_path / "out", "--prompt", "x", *args, kind=kind) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith(message.format(path=path, ckpt=tiny_models[kind]))
    assert len([line for line in err if "error" in line]) == 1
