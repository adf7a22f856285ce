"""`<lora:NAME:TE:UNET>` tags through the real command: the same images as `--network_weights`,
per line and per image, with hashes and tags in the metadata."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import save_file

from library.images.hashes import lora_short_hash
from library.models import load_model
from networks.lora_files import write_kohya_lora
from tests.helpers import meta, pixels, pngs, run


@pytest.fixture(scope="module")
def lora_dir(tiny_models, tmp_path_factory) -> Path:
    model = load_model(str(tiny_models["sd1"]))
    folder = tmp_path_factory.mktemp("lora_dir")
    one = write_kohya_lora(folder / "one.safetensors", model.text_encoder, model.unet, rank=4, seed=0)
    write_kohya_lora(folder / "two.safetensors", model.text_encoder, model.unet, rank=4, seed=1, conv=True)
    (folder / "te_only").mkdir()
    save_file({k: v for k, v in one.items() if k.startswith("lora_te_")}, str(folder / "te_only" / "one_te.safetensors"))
    return folder


def _image(outdir: Path) -> np.ndarray:
    (path,) = pngs(outdir)
    return pixels(path)


def _network(path: Path, *muls: str) -> list[str]:
    return ["--network_module", "networks.lora", "--network_weights", str(path), "--network_mul", *muls]


def test_a_tag_gives_the_image_of_network_weights(tiny_models, tmp_path, lora_dir):
    assert run(tiny_models, tmp_path / "tag", "--prompt", "a cat <lora:one:0.5> --d 3",
               "--lora_dir", str(lora_dir)) == 0
    assert run(tiny_models, tmp_path / "net", "--prompt", "a cat --d 3", *_network(lora_dir / "one.safetensors",
                                                                                    "0.5")) == 0
    assert run(tiny_models, tmp_path / "base", "--prompt", "a cat --d 3") == 0
    tagged = _image(tmp_path / "tag")
    assert np.array_equal(tagged, _image(tmp_path / "net"))
    assert np.abs(tagged - _image(tmp_path / "base")).max() > 10
    (path,) = pngs(tmp_path / "tag")
    text = meta(path)
    assert text["prompt"] == "a cat"
    assert text["raw-prompt"] == "a cat <lora:one:0.5>"  # the line less --d, as the original
    first, params = text["parameters"].split("\n")
    assert first == "a cat <lora:one:0.5>"
    assert f'Lora hashes: "one: {lora_short_hash(lora_dir / "one.safetensors")}"' in params


def test_te_only_tag_leaves_the_unet_untouched(tiny_models, tmp_path, lora_dir):
    assert run(tiny_models, tmp_path / "tag", "--prompt", "a cat <lora:one:1:0> --d 3",
               "--lora_dir", str(lora_dir)) == 0
    assert run(tiny_models, tmp_path / "te", "--prompt", "a cat --d 3",
               *_network(lora_dir / "te_only" / "one_te.safetensors", "1")) == 0
    assert np.array_equal(_image(tmp_path / "tag"), _image(tmp_path / "te"))


def test_tags_split_batches_and_add_to_networks_and_am(tiny_models, tmp_path, lora_dir):
    lines = tmp_path / "p.txt"
    lines.write_text("a cat <lora:two:0.3> --d 5 --am 0.5\na dog <lora:one:0.8> <lora:two:0.2> --d 6\n")
    common = _network(lora_dir / "one.safetensors", "1")
    assert run(tiny_models, tmp_path / "both", "--from_file", str(lines), "--batch_size", "2",
               "--sequential_file_name", *common) == 0
    first, second = (pixels(p) for p in pngs(tmp_path / "both"))
    hashes = {name: lora_short_hash(lora_dir / f"{name}.safetensors") for name in ("one", "two")}
    params = meta(pngs(tmp_path / "both")[1])["parameters"]
    assert params.startswith("a dog <lora:one:1> <lora:one:0.8> <lora:two:0.2>\n")  # the run's, then the tags
    h_one, h_two = hashes["one"], hashes["two"]
    assert params.endswith(f'Lora hashes: "one: {h_one}, two: {h_two}"')
    two = ["--network_module", "networks.lora", "networks.lora", "--network_weights",
           str(lora_dir / "one.safetensors"), str(lora_dir / "two.safetensors")]
    assert run(tiny_models, tmp_path / "a", "--prompt", "a cat --d 5", *two, "--network_mul", "0.5", "0.3") == 0
    assert np.array_equal(first, _image(tmp_path / "a"))
    # the same file twice adds up: --network_weights one at 1 plus the tag's 0.8, then two at 0.2
    three = ["--network_module", *["networks.lora"] * 3, "--network_weights", str(lora_dir / "one.safetensors"),
             str(lora_dir / "one.safetensors"), str(lora_dir / "two.safetensors"), "--network_mul", "1", "0.8", "0.2"]
    assert run(tiny_models, tmp_path / "b", "--prompt", "a dog --d 6", *three) == 0
    assert np.array_equal(second, _image(tmp_path / "b"))


def test_a_bad_tag_skips_its_line_with_file_and_line(tiny_models, tmp_path, lora_dir, caplog):
    lines = tmp_path / "p.txt"
    lines.write_text("a cat --d 1\na dog <lora:onee:1> --d 2\n")
    with caplog.at_level("ERROR"):
        code = run(tiny_models, tmp_path / "out", "--from_file", str(lines), "--lora_dir", str(lora_dir))
    assert code == 3 and len(pngs(tmp_path / "out")) == 1  # a skipped line (exit 3), as other bad prompt lines
    assert (f"{lines}:2: skipped: <lora:onee:1>: no file named 'onee' in {lora_dir}; close names: one, one_te\n"
            in caplog.text)
