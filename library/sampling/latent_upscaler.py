"""A latent upscaler for Highres fix: `--highres_fix_upscaler tools.latent_upscaler`.

    python gen_img.py ... --highres_fix_scale 0.5 --highres_fix_upscaler tools.latent_upscaler \\
        --highres_fix_upscaler_args "weights=latent_upscaler.safetensors"

It implements the upscaler interface of `library.sampling.highres_fix` (`create_upscaler(**kwargs)`
returning an object with `support_latents()` and `upscale(...)`) and works on latents: the
1st stage's latents are interpolated bilinearly to the final size and a small convolutional
network adds a learned correction. The network (defined here, written for this project):

    conv_in      Conv2d(4, C, 3)                      C = channels (from the weights)
    blocks.i     conv1, conv2: Conv2d(C, C, 3)        x + conv2(silu(conv1(silu(x))))
    (nearest interpolation of the features to the final latent size)
    conv_up      Conv2d(C, C, 3)
    conv_out     Conv2d(C, 4, 3)                      output = bilinear + conv_out(silu(conv_up(h)))

Arguments (`--highres_fix_upscaler_args "k=v,..."`): `weights` (required: a .safetensors,
.pt or .ckpt state dict with exactly these keys; .pt/.ckpt are read with
`torch.load(weights_only=True)`, so no code in them runs), `device` (default: where the
latents are).

Weights of other upscalers do not fit this network. `python -m library.sampling.latent_upscaler --init
FILE [--channels 64 --blocks 4]` writes a starting point whose correction is zero (it then
upscales exactly like `--highres_fix_latents_upscaling bilinear`), for training your own or
for trying the option out.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from library.errors import UserError  # noqa: E402

_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.")


class _ResBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.silu(self.conv1(F.silu(x))))


class LatentUpscalerNet(nn.Module):
    """Bilinear interpolation of the latents plus a learned correction."""

    def __init__(self, channels: int = 64, blocks: int = 4, latent_channels: int = 4) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(latent_channels, channels, 3, padding=1)
        self.blocks = nn.ModuleList(_ResBlock(channels) for _ in range(blocks))
        self.conv_up = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv_out = nn.Conv2d(channels, latent_channels, 3, padding=1)

    def forward(self, latents: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        base = F.interpolate(latents, size=size, mode="bilinear", align_corners=False)
        h = self.conv_in(latents)
        for block in self.blocks:
            h = block(h)
        h = F.interpolate(h, size=size, mode="nearest")
        return base + self.conv_out(F.silu(self.conv_up(h)))


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors / .pt / .ckpt file (no code is run)."""
    if not path.is_file():
        raise UserError(f"--highres_fix_upscaler_args weights={path}: no such file")
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # damaged or foreign file: a user problem, one line
        raise UserError(f"--highres_fix_upscaler_args weights={path}: cannot read it ({str(exc)[:120]})") from None
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"--highres_fix_upscaler_args weights={path}: not a state dict of tensors")
    return state


def network_from_state_dict(state: dict[str, torch.Tensor], path: Path) -> LatentUpscalerNet:
    """A network shaped after `state` (channels and block count), with its weights."""
    if "conv_in.weight" not in state:
        raise UserError(f"--highres_fix_upscaler_args weights={path}: not a tools.latent_upscaler network "
                        "(no conv_in.weight); the original's upscaler-v1-e100-220.safetensors layout is not loaded "
                        "(its network definition is not available to this project), so make one with "
                        "python -m library.sampling.latent_upscaler or use --highres_fix_latents_upscaling")
    channels, latent_channels = state["conv_in.weight"].shape[:2]
    blocks = len({m.group(1) for m in map(_BLOCK_KEY.match, state) if m})
    net = LatentUpscalerNet(channels, blocks, latent_channels)
    try:
        net.load_state_dict(state)
    except RuntimeError as exc:
        raise UserError(f"--highres_fix_upscaler_args weights={path}: does not fit the network "
                        f"({str(exc).splitlines()[-1].strip()[:160]})") from None
    return net.eval().requires_grad_(False)


class Upscaler:
    """The object `create_upscaler` returns (the interface of library.sampling.highres_fix)."""

    def __init__(self, net: LatentUpscalerNet, device: str | None = None) -> None:
        self.net = net
        self.device = torch.device(device) if device else None

    def support_latents(self) -> bool:
        return True

    @torch.no_grad()
    def upscale(self, vae, images, latents: torch.Tensor | None, dtype: torch.dtype, width: int, height: int,
                batch_size: int = 1, vae_batch_size: int = 1) -> torch.Tensor:
        """Latents (B, 4, height/8, width/8) in the U-Net's latent space."""
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        if latents is None:
            latents = self._encode(vae, images, vae_batch_size)
        device = self.device or latents.device
        self.net.to(device)
        parts = [
            self.net(chunk.to(device, torch.float32), (height // factor, width // factor))
            for chunk in latents.split(max(1, batch_size))
        ]
        return torch.cat(parts).to(latents.device, dtype)

    @staticmethod
    def _encode(vae, images, vae_batch_size: int) -> torch.Tensor:
        from library.images.input_images import pil_to_tensor

        pixels = pil_to_tensor(images).to(vae.device, vae.dtype)
        means = [vae.encode(c).latent_dist.mean for c in pixels.split(max(1, vae_batch_size))]
        return torch.cat(means).float() * vae.config.scaling_factor


def create_upscaler(**kwargs) -> Upscaler:
    """Entry point for `--highres_fix_upscaler tools.latent_upscaler`."""
    unknown = sorted(set(kwargs) - {"weights", "device"})
    if unknown:
        raise UserError(f"--highres_fix_upscaler_args: unknown argument {unknown[0]}; tools.latent_upscaler takes "
                        "weights=FILE and device=NAME")
    if not kwargs.get("weights"):
        raise UserError('--highres_fix_upscaler_args: tools.latent_upscaler needs "weights=FILE"')
    path = Path(kwargs["weights"])
    return Upscaler(network_from_state_dict(read_state_dict(path), path), kwargs.get("device"))


def write_initial_weights(path: Path, channels: int = 64, blocks: int = 4, seed: int = 0) -> Path:
    """Random weights whose correction is zero (conv_out is zero): bilinear to begin with."""
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    net = LatentUpscalerNet(channels, blocks)
    nn.init.zeros_(net.conv_out.weight)
    nn.init.zeros_(net.conv_out.bias)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--init", metavar="FILE", required=True, help="write starting weights (.safetensors)")
    parser.add_argument("--channels", type=int, default=64, help="feature channels (default 64)")
    parser.add_argument("--blocks", type=int, default=4, help="residual blocks (default 4)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    args = parser.parse_args(argv)
    print(write_initial_weights(Path(args.init), args.channels, args.blocks, args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
