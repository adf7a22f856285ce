"""Deep Shrink: the gate, the sizes per block on an SD-shaped U-Net, and the command line."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel

from library.features.deep_shrink import ShrinkDeepLayers
from library.prompts.line_options import parse_prompt_line
from library.records.deep_shrink_settings import DeepShrink, from_values, with_overrides
from library.sampling.patches import Batch, BatchLayout, Patch, PatchOwner
from library.text.encoder import Conditioning
from tests.helpers import assert_override_stays_on_its_line, pixels, pngs, run


def test_gate_is_exact():
    ds = DeepShrink(1, 650)
    assert ds.shrinks(1, 650) and ds.shrinks(1, 999)
    assert not ds.shrinks(1, 649) and not ds.shrinks(0, 999) and not ds.shrinks(2, 999)
    two = DeepShrink(1, 650, 2, 300)
    assert [two.shrinks(2, t) for t in (650, 649, 300, 299)] == [False, True, True, False]
    assert [two.shrinks(1, t) for t in (650, 649)] == [True, False]
    assert from_values(1, 650, 2, None).timesteps_2 == 1000  # a missing t2 counts as 1000
    assert from_values(None) is None


def test_prompt_overrides_start_from_the_command_line():
    base = DeepShrink(2, 700, None, 650, 0.5)
    over = lambda text: with_overrides(base, parse_prompt_line("x " + text).overrides)  # noqa: E731
    assert over("") is base
    assert over("--dsr 0.25") == DeepShrink(2, 700, None, 650, 0.25)
    assert over("--dsd1 1 --dst1 500") == DeepShrink(1, 500, None, 650, 0.5)
    assert with_overrides(None, parse_prompt_line("x --dst1 600").overrides) == DeepShrink(3, 600)
    zero = DeepShrink(0, 650)  # a command-line depth 0 stays 0 (the original makes it 3)
    assert with_overrides(zero, parse_prompt_line("x --dsr 0.75").overrides) == DeepShrink(0, 650, ratio=0.75)


@pytest.fixture(scope="module")
def sd_unet():
    """An SD 1.x-shaped U-Net (4 levels, 2 layers per block), narrow so it runs in milliseconds."""
    torch.manual_seed(0)
    return UNet2DConditionModel(
        block_out_channels=(8, 16, 16, 16), layers_per_block=2, norm_num_groups=8, cross_attention_dim=16,
        attention_head_dim=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    ).eval()


class Sizes(Patch):
    """Records down-block input sizes (after the shrink) or up-path mismatches (before the resize)."""

    def __init__(self) -> None:
        self.down: list[int | tuple] = []
        self.mismatch: list[tuple] = []

    def down_block_input(self, ctx, depth, hidden):
        self.down.append(tuple(hidden.shape[-2:]))
        return hidden

    def before_skip_concat(self, ctx, up_index, layer, hidden, skip):
        if hidden.shape[-2:] != skip.shape[-2:]:
            self.mismatch.append((up_index, layer, tuple(hidden.shape[-2:]), tuple(skip.shape[-2:])))
        return hidden


def _sizes(unet, settings: DeepShrink, height: int, width: int, t: int):
    before, after = Sizes(), Sizes()
    features = [type("F", (), {"for_batch": lambda self, b, p=p: p})() for p in (before, ShrinkDeepLayers(settings), after)]
    owner = PatchOwner(unet, features)
    batch = Batch((), BatchLayout(1, 1, height, width), None, torch.tensor([t]), torch.device("cpu"), torch.float32)
    g = torch.Generator().manual_seed(1)
    sample, text = torch.randn(1, 4, height, width, generator=g), torch.randn(1, 7, 16, generator=g)
    with torch.no_grad(), owner.installed(batch) as run_:
        out = run_.unet_call(run_.context(0, torch.tensor(t)), sample, torch.tensor(t), Conditioning(text))
    assert out.shape == (1, 4, height, width)
    return [h for h, _ in after.down], before.mismatch, out


@pytest.mark.parametrize("latent,depth,down,resize", [
    ((64, 64), 1, [64, 16, 8, 4], [(2, 2, (16, 16), (32, 32))]),
    ((60, 60), 2, [60, 30, 7, 4], [(1, 2, (7, 7), (15, 15))]),
    ((64, 96), 0, [32, 16, 8, 4], [(3, 2, (32, 48), (64, 96))]),
    ((64, 64), 3, [64, 32, 16, 4], [(0, 2, (4, 4), (8, 8))]),
])
def test_sizes_per_block_match_the_original(sd_unet, latent, depth, down, resize):
    """The original's table: down inputs and the one resize."""
    got_down, mismatch, _ = _sizes(sd_unet, DeepShrink(depth, 650), *latent, t=650)
    assert got_down == down
    assert mismatch == resize
    unshrunk, none, _ = _sizes(sd_unet, DeepShrink(depth, 650), *latent, t=649)
    assert none == [] and unshrunk[0] == latent[0]


def test_ratio_1_is_the_bare_unet_bit_for_bit(sd_unet):
    *_, shrunk = _sizes(sd_unet, DeepShrink(1, 0, ratio=1.0), 64, 64, t=800)
    *_, off = _sizes(sd_unet, DeepShrink(1, 1000), 64, 64, t=800)  # gated off
    assert torch.equal(shrunk, off)


FAST_DS = ["--W", "128", "--H", "128", "--steps", "4", "--sampler", "ddim", "--seed", "3"]


def test_command_line_gate_ratio_and_changes(tiny_models, tmp_path):
    assert run(tiny_models, tmp_path / "off", *FAST_DS, "--prompt", "a cat") == 0
    assert run(tiny_models, tmp_path / "r1", *FAST_DS, "--prompt", "a cat", "--ds_depth_1", "1", "--ds_ratio", "1") == 0
    assert run(tiny_models, tmp_path / "never", *FAST_DS, "--prompt", "a cat", "--ds_depth_1", "1",
               "--ds_timesteps_1", "1000") == 0
    assert run(tiny_models, tmp_path / "on", *FAST_DS, "--prompt", "a cat", "--ds_depth_1", "1") == 0
    off, r1, never, on = (pixels(pngs(tmp_path / d)[0]) for d in ("off", "r1", "never", "on"))
    assert np.array_equal(off, r1) and np.array_equal(off, never)
    assert np.abs(on - off).max() > 0


def test_a_prompt_override_applies_to_its_line_only(tiny_models, tmp_path):
    assert_override_stays_on_its_line(tiny_models, tmp_path, FAST_DS, "--dsd1 1 --dsr 0.5")


def test_depth_outside_the_unet_is_one_line(tiny_models, tmp_path, capsys):
    assert run(tiny_models, tmp_path / "o", *FAST_DS, "--prompt", "x", "--ds_depth_1", "2") == 2
    err = capsys.readouterr().err
    assert err == ("gen_img.py: error: Deep Shrink depth 1 (--ds_depth_1/--dsd1) 2: this U-Net's down blocks "
                   "are 0 to 1\n")
    assert not pngs(tmp_path / "o")


@pytest.mark.parametrize("extra", [
    ["--network_module", "networks.lora", "--network_weights", "{lora}"],
    ["--control_net_models", "{controlnet}", "--guide_image_path", "{guide}"],
    ["--highres_fix_scale", "0.5", "--highres_fix_steps", "3", "--strength", "0.7"],
    ["--sampler", "euler_a"],
])
def test_composes_and_batches_do_not_change_images(tiny_models, tmp_path, extra):
    from PIL import Image

    guide = tmp_path / "guide.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (128, 128, 3), dtype=np.uint8)).save(guide)
    extra = [e.format(lora=tiny_models["lora"], controlnet=tiny_models["controlnet-sd1"], guide=guide) for e in extra]
    common = [*FAST_DS, "--prompt", "a cat --d 5,6", "--images_per_prompt", "2", "--ds_depth_1", "1",
              "--ds_timesteps_1", "600", "--sequential_file_name", *extra]
    assert run(tiny_models, tmp_path / "b1", *common) == 0
    assert run(tiny_models, tmp_path / "b2", *common, "--batch_size", "2") == 0
    assert run(tiny_models, tmp_path / "plain", *[c for c in common if c not in ("--ds_depth_1", "1")]) == 0
    one, two, plain = (sorted(pngs(tmp_path / d))[-1] for d in ("b1", "b2", "plain"))
    assert np.abs(pixels(one) - pixels(two)).max() <= 1
    assert np.abs(pixels(one) - pixels(plain)).max() > 0
