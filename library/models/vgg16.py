"""VGG16's convolutional `features` stack, built with torch alone, loaded from torchvision's file.

VGG16 guidance (`library.features.guidance`) compares the activations of one layer of VGG16's
`features` for the image being generated and the guide image. torchvision is not a dependency:
the stack is rebuilt here with the module indices torchvision uses, so its weight files load
as they are:

    index  0 conv1_1   1 relu   2 conv1_2   3 relu   4 pool
           5 conv2_1   6 relu   7 conv2_2   8 relu   9 pool
          10 conv3_1  11 relu  12 conv3_2  13 relu  14 conv3_3  15 relu  16 pool
          17 conv4_1  18 relu  19 conv4_2  20 relu  21 conv4_3  22 relu  23 pool
          24 conv5_1  25 relu  26 conv5_2  27 relu  28 conv5_3  29 relu  30 pool

(`--vgg16_guidance_layer 20`, the default, is the ReLU after conv4_2.) Channel widths are read
from the file, so a narrow VGG16-shaped test network (`tiny_vgg16_state_dict`) loads through
the same code. Files: torchvision's ``vgg16-397923af.pth`` (a pickled state dict with
``features.N.weight`` / ``features.N.bias`` and ``classifier.*`` keys; the classifier is not
used) or the same tensors as ``.safetensors``. Without `--vgg16_weights` the file is looked for
where torchvision caches it (``$TORCH_HOME/hub/checkpoints/``); nothing is downloaded.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from library.errors import UserError, first_line

logger = logging.getLogger(__name__)

#: torchvision's file name of the ImageNet weights (`VGG16_Weights.IMAGENET1K_V1`).
TORCHVISION_FILE = "vgg16-397923af.pth"
TORCHVISION_URL = "https://download.pytorch.org/models/" + TORCHVISION_FILE
#: Output channels of the 13 convolutions; "M" is a 2x2 max pool.
LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
LAYERS = 31  # modules in `features`: 13 convs, 13 ReLUs, 5 pools


def conv_indices() -> list[int]:
    """The `features` indices of the 13 convolutions (0, 2, 5, ...)."""
    indices, index = [], 0
    for item in LAYOUT:
        if item == "M":
            index += 1
        else:
            indices.append(index)
            index += 2
    return indices


def build_features(widths: list[int]) -> nn.Sequential:
    """The `features` stack with the 13 convolutions' output `widths` (VGG16: `LAYOUT`)."""
    if len(widths) != 13:
        raise ValueError(f"VGG16 has 13 convolutions, got {len(widths)} widths")
    layers: list[nn.Module] = []
    channels, convs = 3, iter(widths)
    for item in LAYOUT:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            width = next(convs)
            layers += [nn.Conv2d(channels, width, kernel_size=3, padding=1), nn.ReLU(inplace=False)]
            channels = width
    return nn.Sequential(*layers)


def default_weights_path() -> Path:
    """Where torchvision keeps its downloaded VGG16 weights (respects $TORCH_HOME)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / TORCHVISION_FILE


def weights_file(path: str | None) -> Path:
    """The VGG16 weight file of `--vgg16_weights` (None: torchvision's cache); one line if it is not there."""
    file = Path(path) if path else default_weights_path()
    if not file.is_file():
        where = f"--vgg16_weights {path}: no such file" if path else \
            f"--vgg16_guidance_scale needs VGG16 weights: no --vgg16_weights and no {file}"
        raise UserError(f"{where}; get torchvision's {TORCHVISION_URL} and give its path with --vgg16_weights")
    return file


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a .pth/.pt/.bin (pickled state dict, weights only) or .safetensors file."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001  (any unreadable file is the user's to fix)
        raise UserError(f"--vgg16_weights {path}: cannot read it ({first_line(exc, 120)})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise UserError(f"--vgg16_weights {path}: not a state dict")
    return state


def load_vgg16_features(path: str | None, device: torch.device, dtype: torch.dtype) -> nn.Sequential:
    """VGG16's `features` with the weights of `path` (default: torchvision's cache), frozen, eval."""
    file = weights_file(path)
    state = read_state_dict(file)
    prefix = "features." if any(k.startswith("features.") for k in state) else ""
    try:
        widths = [int(state[f"{prefix}{i}.weight"].shape[0]) for i in conv_indices()]
        features = build_features(widths)
        features.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)
                                  and k[len(prefix):].split(".")[0].isdigit()})
    except (KeyError, RuntimeError, ValueError) as exc:
        raise UserError(f"--vgg16_weights {file}: not torchvision's VGG16 layout ({first_line(exc, 120)})") from None
    logger.info("VGG16 features from %s (widths %s)", file, widths)
    return features.to(device, dtype).eval().requires_grad_(False)


def tiny_vgg16_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """A narrow VGG16-shaped network in torchvision's key layout (with a small classifier), for tests."""
    widths = [4, 4, 8, 8, 8, 8, 8, 16, 16, 16, 16, 16, 16]
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        features = build_features(widths)
        classifier = nn.Sequential(nn.Linear(16 * 7 * 7, 8), nn.ReLU(), nn.Dropout(), nn.Linear(8, 8), nn.ReLU(),
                                   nn.Dropout(), nn.Linear(8, 10))
        with torch.no_grad():  # He-scaled, so that activations survive 13 random layers
            for module in features:
                if isinstance(module, nn.Conv2d):
                    module.weight.normal_(0.0, (2.0 / module.weight[0].numel()) ** 0.5)
                    module.bias.normal_(0.0, 0.05)
    finally:
        torch.random.set_rng_state(generator_state)
    state = {f"features.{k}": v for k, v in features.state_dict().items()}
    state.update({f"classifier.{k}": v for k, v in classifier.state_dict().items()})
    return state
