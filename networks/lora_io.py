"""Reading LoRA files: ``.safetensors`` (with metadata) or pickled ``.ckpt/.pt`` state dicts.

Pickles are opened only with ``torch.load(weights_only=True)``, which refuses anything but
tensors and plain containers, so a LoRA file cannot run code. Every failure a user can fix
(missing file, damaged file, a pickle that needs arbitrary code) becomes one `UserError`
line naming the file.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import Tensor

from library.errors import UserError

logger = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


def _short(exc: BaseException) -> str:
    """The telling line of an exception message, kept short for a one-line error.

    torch's weights-only unpickler opens with a long paragraph about `weights_only`; the
    actual cause follows "WeightsUnpickler error:".
    """
    message = str(exc)
    marker = "WeightsUnpickler error:"
    if marker in message:
        message = message[message.index(marker) + len(marker) :]
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def corrupt_error(path: Path, exc: BaseException) -> UserError:
    return UserError(
        f"cannot read LoRA file {path}: it is damaged or not a weights file ({_short(exc)}); "
        "re-download it or pass another file to --network_weights"
    )


def _read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    from safetensors import safe_open

    tensors: dict[str, Tensor] = {}
    with safe_open(str(path), framework="pt", device="cpu") as handle:
        metadata = dict(handle.metadata() or {})
        for key in handle.keys():
            tensors[key] = handle.get_tensor(key)
    return tensors, metadata


def _read_pickle(path: Path) -> dict[str, Tensor]:
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        if "Unsupported global" in str(exc):
            raise UserError(
                f"LoRA file {path} needs arbitrary code to load and was refused "
                "(only plain tensors are read from .ckpt/.pt files); convert it to .safetensors"
            ) from exc
        raise corrupt_error(path, exc) from exc
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise corrupt_error(path, TypeError(f"top-level object is {type(data).__name__}, not a dict"))
    return data


def read_lora_file(path: str | Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The file's tensors (on CPU, as stored) and its safetensors metadata ({} for pickles).

    Non-tensor values in a pickle are dropped (they are counted as unknown keys later).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"LoRA file not found: {path}; check the path given to --network_weights")
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        data, metadata = _read_pickle(path), {}
    else:
        try:
            data, metadata = _read_safetensors(path)
        except UserError:
            raise
        except Exception as exc:
            if suffix == ".safetensors":
                raise corrupt_error(path, exc) from exc
            logger.debug("%s is not safetensors (%s); trying a pickle", path, exc)
            data, metadata = _read_pickle(path), {}
    tensors = {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, Tensor)}
    dropped = len(data) - len(tensors)
    if dropped:
        logger.debug("%s: ignored %d non-tensor entries", path, dropped)
    return tensors, metadata
