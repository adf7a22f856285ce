"""Every file hash that image metadata shows, as the A1111 web UI computes it.

`Model hash` (and `VAE hash`): the first 10 hex digits of the whole file's SHA-256. A LoRA's
short hash: the first 12 hex digits of the SHA-256 of a .safetensors file after its header
(the "addnet" hash; other formats: of the whole file). A TI embedding's: the first 12 hex
digits of the whole file's SHA-256. Files are read in 1 MiB chunks, so a multi-GB checkpoint
is never held in memory.

Hashing a 2 GB checkpoint costs 1.2-1.6 s of one core on the benchmark machine, on every
run. `model_hash_cached` keeps the result in a small JSON file (like A1111's `cache.json`)
keyed by the file's absolute path, size and modification time, so later runs read it
instead; a changed file gets a new hash. `start_model_hash` computes it in a background
thread (hashlib releases the GIL), so a first run overlaps it with loading the weights.
The cache lives in `$SDGEN_CACHE_DIR` or `~/.cache/sdgen/`; set `SDGEN_HASH_CACHE=0` to
switch it off. A cache that cannot be read or written is ignored (logged at debug level).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from library.errors import UserError

logger = logging.getLogger(__name__)

_HASH_CHUNK = 1024 * 1024


def model_hash(path: Path) -> str:
    """A1111 `Model hash`: the first 10 hex digits of the whole file's SHA-256.

    The file is read in 1 MiB chunks, so a multi-GB checkpoint is never held in memory.
    """
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(_HASH_CHUNK):
                digest.update(chunk)
    except OSError as e:
        raise UserError(f"{path}: cannot read it ({e.strerror}); check the path") from e
    return digest.hexdigest()[:10]


def _sha256(path: Path, start: int = 0) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(start)
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def lora_short_hash(path: Path) -> str:
    """A1111's LoRA short hash: 12 hex of the SHA-256 after the safetensors header (whole file otherwise)."""
    start = 0
    if path.suffix.lower() == ".safetensors":
        with open(path, "rb") as f:
            start = int.from_bytes(f.read(8), "little") + 8
    return _sha256(path, start)[:12]


def embedding_short_hash(path: Path) -> str:
    """A1111's TI short hash: 12 hex of the whole file's SHA-256."""
    return _sha256(path)[:12]


_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model-hash")
_started: dict[str, Future] = {}
_lock = threading.Lock()


def cache_file() -> Path:
    """Where hashes are remembered."""
    base = os.environ.get("SDGEN_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "sdgen")
    return Path(base) / "model_hashes.json"


def _key(path: Path) -> str:
    info = path.stat()
    return f"{path.resolve()}|{info.st_size}|{info.st_mtime_ns}"


def model_hash_cached(path: Path) -> str:
    """`model_hash(path)`, from the cache when this version of the file was hashed before."""
    if os.environ.get("SDGEN_HASH_CACHE", "1") == "0":
        return model_hash(path)
    key = _key(path)
    store = cache_file()
    entries = _read(store)
    if key in entries:
        return entries[key]
    value = model_hash(path)
    entries = _read(store)  # another run may have added entries meanwhile
    entries[key] = value
    try:
        store.parent.mkdir(parents=True, exist_ok=True)
        temporary = store.with_suffix(f".{os.getpid()}.tmp")
        temporary.write_text(json.dumps(entries, indent=0, sort_keys=True))
        temporary.replace(store)
    except OSError as exc:
        logger.debug("model hash cache %s not written: %s", store, exc)
    return value


MAX_CACHE_BYTES = 16 * 2**20  # thousands of entries are a few hundred KB; more is not our file


def _read(store: Path) -> dict[str, str]:
    """The cache's entries; a damaged one (not JSON, nested too deep to parse, too large, not an
    object) is ignored with one warning per process and rebuilt by the next write."""
    try:
        if store.stat().st_size > MAX_CACHE_BYTES:
            raise ValueError(f"larger than {MAX_CACHE_BYTES // 2**20} MB")
        data = json.loads(store.read_text())
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, RecursionError) as exc:
        _warn_damaged(store, exc)
        return {}
    return {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, str)}


_damaged_warned: set[str] = set()


def _warn_damaged(store: Path, exc: BaseException) -> None:
    reason = "nested too deep" if isinstance(exc, RecursionError) else str(exc).splitlines()[0][:80]
    with _lock:
        if str(store) in _damaged_warned:
            return
        _damaged_warned.add(str(store))
    logger.warning("model hash cache %s is damaged (%s); ignored, and rebuilt with this run's hashes", store, reason)


def start_model_hash(path: Path) -> Future:
    """The hash of `path` being computed in the background; the same future for the same path."""
    name = str(Path(path).absolute())
    with _lock:
        if name not in _started:
            _started[name] = _pool.submit(model_hash_cached, Path(name))
        return _started[name]
