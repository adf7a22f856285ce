"""Hypernetworks in the web UI's file layout: the change at one attention layer by hand, files old
and new, refused pickles, and whole images through the command."""

from __future__ import annotations

import pickle
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from library.errors import UserError
from library.features.hypernetwork import HypernetworkPatch, attention_modules
from networks.hypernetwork import read_hypernetwork
from tests.helpers import fresh, meta, pixels, pngs, run


def _mlp_state(width: int, g: torch.Generator, old: bool = False) -> dict[str, torch.Tensor]:
    w1, b1 = torch.randn(2 * width, width, generator=g) * 0.2, torch.randn(2 * width, generator=g) * 0.1
    w2, b2 = torch.randn(width, 2 * width, generator=g) * 0.2, torch.randn(width, generator=g) * 0.1
    if old:
        return {"linear1.weight": w1, "linear1.bias": b1, "linear2.weight": w2, "linear2.bias": b2}
    return {"linear.0.weight": w1, "linear.0.bias": b1, "linear.2.weight": w2, "linear.2.bias": b2}


def write_webui_hypernetwork(path: Path, widths=(32,), seed: int = 0, old: bool = False) -> dict:
    """A `.pt` as the web UI saves one: width -> [key state dict, value state dict] and its metadata
    (layer structure 1, 2, 1 with ReLU: Sequential indices 0 Linear, 1 ReLU, 2 Linear)."""
    g = torch.Generator().manual_seed(seed)
    data: dict = {w: [_mlp_state(w, g, old), _mlp_state(w, g, old)] for w in widths}
    if not old:
        data.update(layer_structure=[1, 2, 1], activation_func="relu", is_layer_norm=False, activate_output=False,
                    use_dropout=False, dropout_structure=[0, 0, 0], last_layer_dropout=False,
                    weight_initialization="Normal", name="test-hn", sd_checkpoint="0123456789")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(data, path)
    return data


def _by_hand(x: torch.Tensor, state: dict, mult: float, relu: bool = True) -> torch.Tensor:
    w1, b1, w2, b2 = state.values()
    hidden = F.linear(x, w1, b1)
    return x + F.linear(torch.relu(hidden) if relu else hidden, w2, b2) * mult


def _projections(attn, hidden, context, patch=None) -> dict[str, torch.Tensor]:
    seen: dict[str, torch.Tensor] = {}
    with ExitStack() as stack:
        for name in ("to_q", "to_k", "to_v"):
            hook = getattr(attn, name).register_forward_hook(lambda m, a, out, n=name: seen.__setitem__(n, out))
            stack.callback(hook.remove)
        if patch is not None:
            patch.install(stack, None)
        with torch.no_grad():
            attn(hidden, encoder_hidden_states=context)
    return seen


def test_keys_and_values_change_by_mlp_times_mult_queries_stay(tmp_path):
    data = write_webui_hypernetwork(tmp_path / "h.pt")
    unet = fresh().unet
    network = read_hypernetwork(tmp_path / "h.pt")
    assert network.name == "test-hn" and sorted(network.layers) == [32]
    g = torch.Generator().manual_seed(3)
    cross = next(m for m in attention_modules(unet) if m.is_cross_attention and m.to_k.in_features == 32)
    hidden, context = torch.randn(1, 16, 32, generator=g), torch.randn(1, 7, 32, generator=g)
    plain = _projections(cross, hidden, context)
    changed = _projections(cross, hidden, context, HypernetworkPatch(unet, [(network, 0.7)]))
    key_state, value_state = data[32]
    assert torch.equal(changed["to_q"], plain["to_q"])
    assert torch.equal(changed["to_k"], cross.to_k(_by_hand(context, key_state, 0.7)))
    assert torch.equal(changed["to_v"], cross.to_v(_by_hand(context, value_state, 0.7)))
    assert (changed["to_k"] - plain["to_k"]).abs().max() > 1e-3
    # self-attention of width 32: its context is the hidden state; width 64 has no entry and passes through
    own = next(m for m in attention_modules(unet) if not m.is_cross_attention and m.to_k.in_features == 32)
    changed = _projections(own, hidden, None, HypernetworkPatch(unet, [(network, 0.7)]))
    assert torch.equal(changed["to_k"], own.to_k(_by_hand(hidden, key_state, 0.7)))
    wide = next(m for m in attention_modules(unet) if not m.is_cross_attention and m.to_k.in_features == 64)
    hidden64 = torch.randn(1, 4, 64, generator=g)
    plain, changed = _projections(wide, hidden64, None), _projections(wide, hidden64, None,
                                                                       HypernetworkPatch(unet, [(network, 0.7)]))
    assert all(torch.equal(plain[k], changed[k]) for k in plain)


def test_old_linear1_linear2_files_load(tmp_path):
    data = write_webui_hypernetwork(tmp_path / "old.pt", old=True)
    network = read_hypernetwork(tmp_path / "old.pt")
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(1))
    assert torch.equal(network.apply(x, 1, 0.5), _by_hand(x, data[32][1], 0.5, relu=False))


class _Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_a_pickle_that_would_run_code_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps({32: _Payload()}, protocol=2))
    with pytest.raises(UserError) as info:
        read_hypernetwork(path)
    assert str(info.value) == (f"hypernetwork {path}: the file needs code to load and was refused (only tensors "
                               "and plain values are read from hypernetwork files)")
    assert "must never run" not in capsys.readouterr().out
    (tmp_path / "bad.pt").write_bytes(b"\x80\x02garbage")
    with pytest.raises(UserError) as info:
        read_hypernetwork(tmp_path / "bad.pt")
    assert str(info.value) == (f"hypernetwork {tmp_path / 'bad.pt'}: damaged or not a hypernetwork file "
                               "(Unsupported operand 103)")
    torch.save({"name": "x"}, tmp_path / "empty.pt")
    with pytest.raises(UserError) as info:
        read_hypernetwork(tmp_path / "empty.pt")
    assert str(info.value) == (f"hypernetwork {tmp_path / 'empty.pt'}: no layers (no integer context-width keys); "
                               "not a hypernetwork file")


def test_images_with_tags_and_the_run_option(tiny_models, tmp_path):
    write_webui_hypernetwork(tmp_path / "hn" / "anime.pt", widths=(32, 64), seed=1)
    folder = ["--hypernetwork_dir", str(tmp_path / "hn")]
    assert run(tiny_models, tmp_path / "base", "--prompt", "a cat --d 3") == 0
    assert run(tiny_models, tmp_path / "zero", "--prompt", "a cat <hypernet:anime:0> --d 3", *folder) == 0
    assert run(tiny_models, tmp_path / "tag", "--prompt", "a cat <hypernet:anime:0.8> --d 3", *folder) == 0
    assert run(tiny_models, tmp_path / "option", "--prompt", "a cat --d 3", "--hypernetwork",
               str(tmp_path / "hn" / "anime.pt"), "--hypernetwork_mul", "0.8") == 0
    base, zero, tag, option = (pixels(pngs(tmp_path / d)[0]) for d in ("base", "zero", "tag", "option"))
    assert np.array_equal(zero, base)
    assert np.array_equal(tag, option)
    assert np.abs(tag - base).max() > 10
    params = meta(pngs(tmp_path / "tag")[0])["parameters"]
    assert params.startswith("a cat <hypernet:anime:0.8>\n")
    assert "Hypernet: anime, Hypernet strength: 0.8" in params


class _Fails(Exception):
    pass


def test_a_failing_batch_with_tags_and_editing_leaves_no_hook(tiny_models, tmp_path):
    """A hypernetwork, a LoRA tag and alternation in one batch that raises at its last step: during
    it the projections and LoRA layers are hooked; after it every module's hooks are as before."""
    from library.prompts.seeds import SeedSource
    from library.prompts.sources import Line
    from library.sampling.patches import FixedFeature, Patch
    from tests.helpers import build_run

    write_webui_hypernetwork(tmp_path / "hn" / "anime.pt", widths=(32, 64))
    lora = Path(tiny_models["lora"])
    built = build_run(["--ckpt", str(tiny_models["sd1"]), "--outdir", str(tmp_path / "out"), "--steps", "3",
                       "--W", "64", "--H", "64", "--lora_dir", str(lora.parent), "--hypernetwork_dir",
                       str(tmp_path / "hn"), "--prompt", f"a [cat|dog] <lora:{lora.stem}:0.5> <hypernet:anime:0.7>"])
    jobs = list(built.runner.jobs([Line(built.options.rounds.prompt, "--prompt")], SeedSource(3, True), None))
    models = (built.model.unet, built.model.text_encoder)

    def hooks() -> list:
        return [(name, tuple(m._forward_pre_hooks), tuple(m._forward_hooks), tuple(m._forward_hooks_with_kwargs))
                for model in models for name, m in model.named_modules()]

    before, during = hooks(), []

    class Boom(Patch):
        def after_step(self, ctx, latents):
            if ctx.last:
                during.extend(hooks())
                raise _Fails()
            return latents

    built.pipeline.patches.add(FixedFeature(Boom()))
    with pytest.raises(_Fails):
        built.pipeline.latents(jobs)
    assert hooks() == before
    assert sum(len(pre) for _, pre, _, _ in during) == 2 * len(attention_modules(built.model.unet))
    assert sum(len(kw) for _, _, _, kw in during) > 0  # the LoRA tag's layers


def test_it_composes_with_attention_couple_controlnet_deep_shrink_and_editing(tiny_models, tmp_path):
    """The same run with Attention Couple, ControlNet, Deep Shrink, a LoRA tag and alternation: a
    hypernetwork at 0 is the run without it bit for bit; at 0.8 it changes the image."""
    from PIL import Image

    from tests.helpers import make_source

    write_webui_hypernetwork(tmp_path / "hn" / "anime.pt", widths=(32, 64), seed=2)
    mask = np.zeros((64, 64, 3), np.uint8)
    mask[:, :32, 0], mask[:, 32:, 1] = 255, 255
    Image.fromarray(mask).save(tmp_path / "rg.png")
    lora = Path(tiny_models["lora"])
    common = ["--attention_couple", "--mask_path", str(tmp_path / "rg.png"), "--control_net_models",
              str(tiny_models["controlnet-sd1"]), "--guide_image_path", str(make_source(tmp_path / "g.png")),
              "--ds_depth_1", "1", "--ds_timesteps_1", "900", "--lora_dir", str(lora.parent),
              "--hypernetwork_dir", str(tmp_path / "hn")]
    prompt = f"a [cat|dog] <lora:{lora.stem}:0.5> AND a bird --d 4"
    images = {}
    for name, tag in (("none", ""), ("zero", " <hypernet:anime:0>"), ("on", " <hypernet:anime:0.8>")):
        assert run(tiny_models, tmp_path / name, "--prompt", prompt.replace(" AND", f"{tag} AND"), *common) == 0
        images[name] = pixels(pngs(tmp_path / name)[0])
    assert np.array_equal(images["zero"], images["none"])
    assert np.abs(images["on"] - images["none"]).max() > 10
