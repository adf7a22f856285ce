"""The extra networks a prompt asks for with the web UI's tags (`<lora:...>`, `<hypernet:...>`).

Frozen records, part of each `Job` (and of its `batch_key`): images whose tags differ never
share a batch, so a tag changes only the image whose prompt carries it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LoraUse:
    """One `<lora:NAME:TE:UNET>` tag, its NAME resolved to a file."""

    name: str  # as written in the tag (the file name without extension)
    path: str
    text_encoder: float  # multiplier of the text-encoder layers
    unet: float  # multiplier of the U-Net layers

    def tag(self) -> str:
        """The tag as the web UI writes it: `<lora:name:te>` or `<lora:name:te:unet>`."""
        if self.unet == self.text_encoder:
            return f"<lora:{self.name}:{self.text_encoder:g}>"
        return f"<lora:{self.name}:{self.text_encoder:g}:{self.unet:g}>"


@dataclass(frozen=True)
class HypernetUse:
    """One `<hypernet:NAME:MULT>` tag (or `--hypernetwork FILE`), NAME resolved to a file."""

    name: str
    path: str
    multiplier: float

    def tag(self) -> str:
        return f"<hypernet:{self.name}:{self.multiplier:g}>"
