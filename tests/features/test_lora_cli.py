"""LoRA through the real command: --network_* options and the --am prompt option."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from library.models import load_model
from networks.lora_files import write_kohya_lora
from tests.helpers import pixels, pngs, run


@pytest.fixture(scope="module")
def loras(tiny_models, tmp_path_factory) -> list[Path]:
    model = load_model(str(tiny_models["sd1"]))
    folder = tmp_path_factory.mktemp("loras")
    paths = [folder / "one.safetensors", folder / "two.safetensors"]
    for seed, path in enumerate(paths):
        write_kohya_lora(path, model.text_encoder, model.unet, rank=4, seed=seed, conv=seed == 1)
    return paths


def _network_args(loras, *muls: str) -> list[str]:
    return ["--network_module", "networks.lora", "networks.lora", "--network_weights", *map(str, loras),
            "--network_mul", *muls]


def test_am_switches_networks_per_prompt_line_in_one_run(tiny_models, tmp_path, loras):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat --d 3\na cat --d 3 --am 0.0,0.0\na cat --d 3\n")
    assert run(tiny_models, tmp_path / "lora", "--from_file", str(prompts), "--sequential_file_name",
               *_network_args(loras, "0.4", "0.8")) == 0
    assert run(tiny_models, tmp_path / "base", "--prompt", "a cat --d 3") == 0
    with_lora, switched_off, again = (pixels(p) for p in pngs(tmp_path / "lora"))
    (base,) = (pixels(p) for p in pngs(tmp_path / "base"))
    assert np.array_equal(switched_off, base)
    assert np.array_equal(with_lora, again)
    assert np.abs(with_lora - base).max() > 10


@pytest.mark.parametrize("mode", [[], ["--network_pre_calc"], ["--network_merge"]])
def test_unmerged_pre_calc_and_merged_give_the_same_image(tiny_models, tmp_path, loras, mode):
    assert run(tiny_models, tmp_path / "hooks", "--prompt", "a dog --d 4", *_network_args(loras, "0.4", "0.8")) == 0
    assert run(tiny_models, tmp_path / "other", "--prompt", "a dog --d 4", *_network_args(loras, "0.4", "0.8"),
               *mode) == 0
    a, b = pixels(pngs(tmp_path / "hooks")[0]), pixels(pngs(tmp_path / "other")[0])
    assert np.abs(a - b).max() <= 1


def test_network_option_errors_are_exit_2(tiny_models, tmp_path, loras, capsys):
    with pytest.raises(SystemExit) as info:
        run(tiny_models, tmp_path, "--prompt", "x", *_network_args(loras, "0.4", "0.5", "0.6"))
    assert info.value.code == 2
    assert "--network_mul has 3 values but --network_module has 2; give at most one per network" in (
        capsys.readouterr().err)
    sd2 = load_model(str(tiny_models["sd2"]))
    write_kohya_lora(tmp_path / "sd2.safetensors", sd2.text_encoder, sd2.unet, rank=2)
    code = run(tiny_models, tmp_path / "out", "--prompt", "x", "--network_module", "networks.lora",
               "--network_weights", str(tmp_path / "sd2.safetensors"))
    assert code == 2
    assert "is for a different base model" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() or not pngs(tmp_path / "out")


def test_network_show_meta_prints_training_metadata(tiny_models, tmp_path, loras, capsys):
    assert run(tiny_models, tmp_path, "--prompt", "x", "--network_module", "networks.lora",
               "--network_weights", str(loras[0]), "--network_show_meta") == 0
    out = capsys.readouterr().out
    assert f"metadata of {loras[0]}:" in out and "ss_network_dim: 4" in out
