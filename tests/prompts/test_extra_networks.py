"""The `<lora:...>` / `<hypernet:...>` tag parser and the tag-name lookup: exact outputs and messages."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from library.errors import UserError
from library.prompts.extra_networks import NetworkFiles, prompt_networks, split_tags
from library.records.extra_networks import HypernetUse, LoraUse


@pytest.fixture
def files(tmp_path) -> NetworkFiles:
    (tmp_path / "loras" / "sub").mkdir(parents=True)
    (tmp_path / "hn").mkdir()
    for name in ("style.safetensors", "sub/detail.pt", "other.txt", "stylish.safetensors"):
        (tmp_path / "loras" / name).write_bytes(b"")
    (tmp_path / "hn" / "anime.pt").write_bytes(b"")
    return NetworkFiles((str(tmp_path / "loras"),), (str(tmp_path / "hn"),))


def test_tags_are_cut_from_the_text():
    text, tags = split_tags("a <lora:style:0.5> cat, <hypernet:anime> ")
    assert text == "a  cat,"
    assert [(t.kind, t.positional, t.named) for t in tags] == [("lora", ("style", "0.5"), ()),
                                                                ("hypernet", ("anime",), ())]
    assert split_tags("no tags (here:1.2) [x]") == ("no tags (here:1.2) [x]", ())


def test_lora_weights_positional_and_named(files, tmp_path):
    path = str(tmp_path / "loras" / "style.safetensors")
    cases = {
        "<lora:style>": (1.0, 1.0),
        "<lora:style:0.5>": (0.5, 0.5),
        "<lora:style:1:0>": (1.0, 0.0),
        "<lora:style:te=0.25:unet=2>": (0.25, 2.0),
        "<lora:style:0.7:unet=0.1>": (0.7, 0.1),
        "<lyco:style:0.3>": (0.3, 0.3),
    }
    for tag, (te, unet) in cases.items():
        text, nets = prompt_networks(f"x {tag}", files)
        assert text == "x"
        assert nets.loras == (LoraUse("style", path, te, unet),), tag
    _, nets = prompt_networks("<lora:detail:1> <lora:detail:0.5> <hypernet:anime:0.4>", files)
    assert [u.path.endswith("sub/detail.pt") for u in nets.loras] == [True, True]
    assert nets.hypernetworks == (HypernetUse("anime", str(tmp_path / "hn" / "anime.pt"), 0.4),)
    assert LoraUse("a", "p", 1, 0).tag() == "<lora:a:1:0>" and LoraUse("a", "p", 0.5, 0.5).tag() == "<lora:a:0.5>"


@pytest.mark.parametrize(("prompt", "message"), [
    ("<foo:bar>", "<foo:bar>: unknown tag type 'foo' (known: <lora:NAME:WEIGHT>, <lyco:NAME:WEIGHT>, "
                  "<hypernet:NAME:MULT>)"),
    ("<lora::1>", "<lora::1>: the tag names no file (write <lora:NAME>)"),
    ("<lora:style:x>", "<lora:style:x>: TE weight 'x' is not a number"),
    ("<lora:style:1:nan>", "<lora:style:1:nan>: UNET weight 'nan' is not a number"),
    ("<hypernet:anime:big>", "<hypernet:anime:big>: multiplier 'big' is not a number"),
])
def test_malformed_tags(files, prompt, message):
    with pytest.raises(UserError) as info:
        prompt_networks(prompt, files)
    assert str(info.value) == message


def test_a_missing_name_lists_close_names(files, tmp_path):
    with pytest.raises(UserError) as info:
        prompt_networks("<lora:styl:1>", files)
    assert str(info.value) == (f"<lora:styl:1>: no file named 'styl' in {tmp_path / 'loras'}; "
                               "close names: style, stylish")
    with pytest.raises(UserError) as info:
        prompt_networks("<hypernet:x>", NetworkFiles(("a",)))
    assert str(info.value) == "<hypernet:x>: no folder to look for 'x' in; give --hypernetwork_dir"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(st.lists(st.sampled_from(["<", ">", ":", "=", "lora", "hypernet", "lyco", "foo", "style", "1", "0.5",
                                 "nan", "te", "unet", "dyn", " ", "é", "\\"]) | st.text(max_size=3),
                max_size=25).map("".join))
def test_fuzz_tags_raise_only_user_errors(files, text):
    try:
        stripped, nets = prompt_networks(text, files)
    except UserError:
        return
    assert "<lora:" not in stripped.lower() or ">" not in stripped.split("<lora:", 1)[-1]


def test_network_weights_folders_are_searched_without_sub_folders(tmp_path, files):
    flat = NetworkFiles(flat_dirs=(str(tmp_path / "loras"),))
    assert prompt_networks("<lora:style>", flat)[1].loras[0].path == str(tmp_path / "loras" / "style.safetensors")
    with pytest.raises(UserError) as info:
        prompt_networks("<lora:detail>", flat)
    assert str(info.value) == f"<lora:detail>: no file named 'detail' in {tmp_path / 'loras'}"
