"""Write the tiny SD1 / SD2 / SD2-v / SDXL models (`library.models.tiny`) in the real file layouts.

The test fixtures and the demo model that `gen_img.py` uses without `--ckpt` (`make_demo_model`:
one file, `demo-sd1.safetensors`, the tiny SD1 model with the U-Net of `tiny.demo_unet_config`)
come from here; `tools/make_tiny_model.py` is the command line over it.

For each kind it writes `tiny-<kind>.safetensors` (one file, original LDM key layout, as
downloaded from model sites) and `tiny-<kind>/` (a Diffusers folder with unet/, vae/,
text_encoder/, tokenizer/, scheduler/; SDXL's also text_encoder_2/, tokenizer_2/) holding the
same weights (SDXL's single file is in Stability AI's layout, `conditioner.embedders.*`); plus `tiny-vae.safetensors`,
a separate VAE with other weights (for `--vae`). The files that go with a model but are read
by later stages (an embedding, a LoRA) are written by `tools/make_tiny_model.py`
(`write_tiny_extras`). The v-prediction file carries a `v_pred`
key and its folder a scheduler config with `prediction_type: v_prediction`, as real ones
can.

ControlNets (ControlNet 1.0 style, made from the tiny U-Net of the same kind, every weight
random so that even the zero convolutions change the image): `tiny-controlnet-sd1.safetensors`
(original `control_model.*` layout), `tiny-controlnet-sd1/` (Diffusers folder, same weights),
`tiny-controlnet-sd1-diff.safetensors` (the same network stored as a difference to the tiny
SD1 U-Net, with a `difference` key) and, with sd2, `tiny-controlnet-sd2.safetensors`.

Guidance models (with sd1): `tiny-clip/` (a transformers `CLIPModel` folder, random weights,
ViT-B/32 geometry), `tiny-clip.safetensors` (the same tensors as one file, no config) and
`tiny-vgg16.pth` (a narrow VGG16-shaped network in torchvision's state-dict layout).

Existing outputs are kept, so calling it again is free. Takes a few seconds on a CPU.
"""

from __future__ import annotations

from pathlib import Path

from library.models.ldm_export import controlnet_to_ldm, vae_to_ldm
from library.models.save import save_diffusers_folder, save_single_file, save_tensors
from library.models.tiny import KINDS, Kind, build_tiny_components, demo_unet_config, tiny_controlnet

DEMO_FILE = "demo-sd1.safetensors"


def make_demo_model(outdir: Path) -> tuple[Path, bool]:
    """The demo model's one file in `outdir`, written if missing; and whether it was written now.

    Only this file is written (no Diffusers folder, VAE, ControlNets or guidance models: the demo
    uses none of them). The write is atomic under a name of this process's own, so processes of
    a split run that start together may each write it; they write the same bytes.
    """
    path = outdir / DEMO_FILE
    if path.is_file():
        return path, False
    outdir.mkdir(parents=True, exist_ok=True)
    c = build_tiny_components("sd1", seed=0, unet=demo_unet_config())
    save_single_file(c.text_encoder, c.unet, c.vae, "sd1", path)
    return path, True


def make_tiny_models(outdir: Path, kinds: tuple[Kind, ...] = KINDS) -> dict[str, Path]:
    """Write the tiny models of `kinds` (and the separate VAE) into `outdir`; return their paths."""
    outdir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for kind in kinds:
        single, folder = outdir / f"tiny-{kind}.safetensors", outdir / f"tiny-{kind}"
        if not (single.is_file() and (folder / "model_index.json").is_file()):
            from library.models.tokenizer import load_tokenizer

            c = build_tiny_components(kind, seed=0)
            save_single_file(c.text_encoder, c.unet, c.vae, kind, single, text_encoder_2=c.text_encoder_2)
            tokenizer = load_tokenizer("sd1" if kind in ("sd1", "sdxl") else "sd2")
            tokenizer_2 = load_tokenizer("sdxl-2") if kind == "sdxl" else None
            save_diffusers_folder(c.text_encoder, tokenizer, c.unet, c.vae, kind, folder, c.text_encoder_2, tokenizer_2)
        paths[kind], paths[f"{kind}-diffusers"] = single, folder
    vae_path = outdir / "tiny-vae.safetensors"
    if not vae_path.is_file():
        save_tensors(vae_to_ldm(build_tiny_components("sd1", seed=1).vae.state_dict()), vae_path)
    paths["vae"] = vae_path
    if "sd1" in kinds:
        paths.update(_guidance_models(outdir))
    paths.update(_controlnets(outdir, kinds))
    return paths


def _guidance_models(outdir: Path) -> dict[str, Path]:
    """The tiny CLIP (folder and single file) and VGG16 of CLIP / VGG16 guidance."""
    import torch

    from library.models.clip_guidance import tiny_clip_model
    from library.models.vgg16 import tiny_vgg16_state_dict

    folder, single, vgg = outdir / "tiny-clip", outdir / "tiny-clip.safetensors", outdir / "tiny-vgg16.pth"
    if not ((folder / "config.json").is_file() and single.is_file()):
        clip = tiny_clip_model(seed=20)
        clip.save_pretrained(folder, safe_serialization=True)
        save_tensors({k: v.contiguous() for k, v in clip.state_dict().items()}, single)
    if not vgg.is_file():
        torch.save(tiny_vgg16_state_dict(seed=21), vgg)
    return {"clip": folder, "clip-file": single, "vgg16": vgg}


def _controlnets(outdir: Path, kinds: tuple[Kind, ...]) -> dict[str, Path]:
    """The tiny ControlNets: SD1 as single file, Diffusers folder and difference file; SD2 file."""
    import torch

    paths: dict[str, Path] = {}
    if "sd1" in kinds:
        single = outdir / "tiny-controlnet-sd1.safetensors"
        folder = outdir / "tiny-controlnet-sd1"
        diff = outdir / "tiny-controlnet-sd1-diff.safetensors"
        if not (single.is_file() and (folder / "diffusion_pytorch_model.safetensors").is_file() and diff.is_file()):
            unet = build_tiny_components("sd1", seed=0).unet
            controlnet = tiny_controlnet(unet, seed=10)
            save_tensors(controlnet_to_ldm(controlnet.state_dict(), controlnet.config), single)
            controlnet.save_pretrained(folder, safe_serialization=True)
            unet_sd = unet.state_dict()
            difference = {
                key: tensor - unet_sd[key] if key in unet_sd else tensor
                for key, tensor in controlnet.state_dict().items()
            }
            diff_ldm = controlnet_to_ldm(difference, controlnet.config)
            diff_ldm["difference"] = torch.tensor(1.0)
            save_tensors(diff_ldm, diff)
        paths.update({"controlnet-sd1": single, "controlnet-sd1-diffusers": folder, "controlnet-sd1-diff": diff})
    if "sd2" in kinds:
        sd2 = outdir / "tiny-controlnet-sd2.safetensors"
        if not sd2.is_file():
            controlnet = tiny_controlnet(build_tiny_components("sd2", seed=0).unet, seed=11)
            save_tensors(controlnet_to_ldm(controlnet.state_dict(), controlnet.config), sd2)
        paths["controlnet-sd2"] = sd2
    return paths
