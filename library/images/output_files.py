"""Output image files: the original tool's file names and atomic, never-overwriting saves.

`output_file_name` reproduces the original tool's naming rules so that users' scripts find
their files where they expect them; `save_image` publishes a finished PNG/WebP file
atomically and never overwrites one. What goes into the metadata is `library.images.metadata`.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import itertools
import logging
import os
import re
import secrets
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

from PIL import Image, PngImagePlugin

from library import interrupts
from library.errors import UserError
from library.images.metadata import webp_exif
from library.messages import quoted, write_failure

logger = logging.getLogger(__name__)

_MAX_NAME_TRIES = 100_000
_NO_HARD_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EXDEV}

# ----------------------------------------------------------------------------- file names


def timestamp_now() -> str:
    """Local time as `YYYYmmddHHMMSS`, the timestamp part of default output names."""
    return time.strftime("%Y%m%d%H%M%S", time.localtime())


def output_file_name(
    *,
    timestamp: str,
    index: int,
    seed: int,
    highres_stage: str = "",
    sequential: int | None = None,
    original_name: str | None = None,
    prompt_file_name: str | None = None,
) -> str:
    """The file name the original tool gives one image, by its precedence rules.

    1. `--f name` on the prompt line: the name as given; `.png` is appended unless it
       already ends with `.webp` or `.png` (case-insensitive; avoids `x.png.png`).
    2. `--use_original_file_name`: the img2img source's stem + `.png` (no prefix).
    3. `--sequential_file_name`: `im_{hr}{n:06d}.png`, `sequential` being the 1-based number.
    4. Otherwise `im_{timestamp}_{hr}{index:03d}_{seed}.png`.
    `highres_stage` is "0"/"1" for the Highres fix stages and "" without it.
    """
    if prompt_file_name is not None:
        if prompt_file_name.lower().endswith((".webp", ".png")):
            return prompt_file_name
        return prompt_file_name + ".png"
    if original_name is not None:
        return Path(original_name).stem + ".png"
    if sequential is not None:
        return f"im_{highres_stage}{sequential:06d}.png"
    return f"im_{timestamp}_{highres_stage}{index:03d}_{seed}.png"


class NamePlan:
    """The run's file names, decided in Job order before any file is written.

    A name asked for twice (`--f same` on two images) gets `stem_1.ext`, `stem_2.ext`, ...
    exactly as saving one image after the other into an empty folder would, but without
    looking at the folder: every process of a split run (`library.run.distributed`) plans every
    name, so an image's name never depends on which process wrote it first.
    """

    def __init__(self) -> None:
        self._asked: dict[str, str] = {}  # planned name -> the name asked for

    def claim(self, name: str) -> str:
        """The first of `name`, `stem_1.ext`, ... that no earlier image of the run has."""
        for candidate in _candidate_names(name):
            if candidate not in self._asked:
                self._asked[candidate] = name
                return candidate
        raise UserError(f"no free file name for {name}: more than {_MAX_NAME_TRIES} images with one --f name")

    def asked(self, planned: str) -> str:
        """The name that `planned` was claimed for (`save_image`'s `variant_of`)."""
        return self._asked.get(planned, planned)


_TIMESTAMPED = re.compile(r"^im_\d{14}_(.+)$")


class ExistingImages:
    """`--skip_existing`: the image names in `--outdir` when the run started, and the hidden
    `.part` files a stopped run left there (one listing of the folder for the whole run).

    A default name (`im_{timestamp}_{index}_{seed}.png`) counts as there whatever its
    timestamp, because a restarted run has a new one; other names must match exactly. An
    empty or unreadable image (a crash on a file system without hard links, a truncated
    copy) does not count: it is checked (its chunks, not its pixels) when asked about, and
    removed before its image is made again.
    """

    def __init__(self, outdir: Path) -> None:
        self.outdir = Path(outdir)
        try:
            entries = [entry.name for entry in os.scandir(outdir) if entry.is_file()]
        except FileNotFoundError:
            entries = []
        except OSError as e:
            raise UserError(f"--outdir {outdir}: cannot list it ({e.strerror}); check permissions") from e
        self._there: dict[str, list[str]] = {}  # untimed name -> the files with it
        for name in entries:
            if not name.endswith(".part"):
                self._there.setdefault(_untimed(name), []).append(name)
        self._sound: dict[str, bool] = {}  # file name -> it reads as an image
        self._parts: dict[str, list[str]] = {}  # untimed target name (its first 80 characters) -> part files
        for name in entries:
            if name.startswith(".") and name.endswith(".part") and name.count(".") >= 3:
                self._parts.setdefault(_untimed(name[1:].rsplit(".", 2)[0]), []).append(name)

    def __contains__(self, name: str) -> bool:
        return any(self._reads(file) for file in self._there.get(_untimed(name), ()))

    def _reads(self, file: str) -> bool:
        """True when `file` is a complete image (checked once)."""
        if file not in self._sound:
            self._sound[file] = _is_complete_image(self.outdir / file)
        return self._sound[file]

    def remove_stale_parts(self, name: str) -> None:
        """Delete the `.part` files a stopped run left of `name`, and an empty or unreadable
        image under `name` (it is made again under that name).

        Only for names that this process is about to write: no other process of the run
        writes them, so their `.part` files are stale. Names longer than the 80 characters
        kept in a `.part` name are left alone.
        """
        for file in self._there.get(_untimed(name), ()):
            if not self._reads(file):
                (self.outdir / file).unlink(missing_ok=True)
                logger.info("removed %s: empty or unreadable, made again", file)
        if len(name) > 80:
            return
        for stale in self._parts.pop(_untimed(name), []):
            (self.outdir / stale).unlink(missing_ok=True)
            logger.info("removed %s, left by a stopped run", stale)


def _is_complete_image(path: Path) -> bool:
    """True when `path` opens as an image whose every chunk is there (PIL's `verify`, which
    reads a PNG to its end without decoding pixels)."""
    try:
        if path.stat().st_size == 0:
            return False
        with Image.open(path) as image:
            image.verify()
        return True
    except Exception:  # PIL raises many kinds for a damaged file; each means "not there"
        return False


def _untimed(name: str) -> str:
    """A default name with its timestamp replaced by `*`; any other name as it is."""
    match = _TIMESTAMPED.match(name)
    return f"im_*_{match.group(1)}" if match else name


# ----------------------------------------------------------------------------- saving


#: The longest `--f` name, in bytes: the file systems' 255, less room for a `_99999` variant.
MAX_FILE_NAME_BYTES = 240


def check_file_name(name: str) -> None:
    """Refuse a `--f` name that cannot be a file of its own in `--outdir` (a `UserError`; the
    prompt line that gives it is skipped): folders, ``.``/``..``, NUL, too long."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise UserError(f"output file name '{quoted(name)}' must be a plain file name; remove folders from --f")
    size = len(name.encode("utf-8", "surrogatepass"))
    if size > MAX_FILE_NAME_BYTES:
        raise UserError(f"output file name '{quoted(name)}' is {size} bytes long; --f names are at most "
                        f"{MAX_FILE_NAME_BYTES} bytes")


def save_image(image: Image.Image, outdir: Path, name: str, text: Mapping[str, str],
               variant_of: str | None = None) -> Path:
    """Save `image` as `outdir/name` with `text` as metadata; return the path written.

    An existing file is never overwritten: if `name` is taken, `stem_1.ext`, `stem_2.ext`, ...
    of `variant_of` (default `name`; a planned `x_1.png` is a variant of `x.png`) is used. The
    image is encoded into a temporary file (a dot-name ending in `.part`) in
    `outdir`, fsynced, and published with `os.link`, which fails instead of replacing an
    existing file, so no reader ever sees a half-written file under an image name. On any
    error (including Ctrl+C) the temporary file is removed.
    PNG: each `text` item becomes a tEXt chunk, or iTXt where it is not latin-1.
    WebP (name ending `.webp`): only `text["parameters"]` is kept, as EXIF UserComment.
    """
    if not name or name in (".", "..") or "/" in name or "\\" in name:
        raise UserError(f"output file name {name!r} must be a plain file name; remove folders from --f")
    outdir = Path(outdir)
    try:
        outdir.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as e:
        raise UserError(f"--outdir {outdir}: is not a folder; give a folder path") from e
    except OSError as e:
        raise UserError(f"--outdir {outdir}: cannot create it ({e.strerror}); check the path and permissions") from e
    webp = name.lower().endswith(".webp")
    fd, tmp = _create_temp(outdir, name)
    try:
        with interrupts.temporary_file(tmp):  # an interrupted process removes it on its way out
            with os.fdopen(fd, "wb") as f:
                _encode(image, f, webp, text)
                f.flush()
                os.fsync(f.fileno())
            final = _publish(tmp, outdir, name, variant_of or name)
    except OSError as e:
        if e.errno is None:  # an encoder problem, not the file system: a bug
            raise
        raise UserError(write_failure(outdir, name, e)) from e
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(outdir)
    logger.debug("saved %s", final)
    return final


def _create_temp(outdir: Path, name: str) -> tuple[int, Path]:
    """Open a new hidden `.{name}.{random}.part` file in `outdir` (mode as the umask allows)."""
    while True:
        tmp = outdir / f".{name[:80]}.{secrets.token_hex(6)}.part"
        try:
            return os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_BINARY", 0), 0o666), tmp
        except FileExistsError:
            continue
        except OSError as e:
            raise UserError(f"--outdir {outdir}: cannot write there ({e.strerror}); check permissions") from e


def _encode(image: Image.Image, f, webp: bool, text: Mapping[str, str]) -> None:
    """Write the encoded image with its metadata to the open binary file `f`."""
    if webp:
        image.save(f, format="WEBP", quality=100, exif=webp_exif(text))
        return
    info = PngImagePlugin.PngInfo()
    for key, value in text.items():
        # NUL ends a text chunk's keyword and is not allowed in its text: a prompt's NULs are dropped
        info.add_text(key.replace("\0", ""), value.replace("\0", ""))  # iTXt where not latin-1
    image.save(f, format="PNG", pnginfo=info)


def _candidate_names(name: str) -> Iterable[str]:
    """`name`, then `stem_1.ext`, `stem_2.ext`, ... (the extension kept as given)."""
    yield name
    stem, ext = os.path.splitext(name)
    for n in range(1, _MAX_NAME_TRIES):
        yield f"{stem}_{n}{ext}"


def _publish(tmp: Path, outdir: Path, name: str, variant_of: str) -> Path:
    """Give the finished `tmp` its first free final name, without replacing any file."""
    candidates = itertools.chain((name,), (c for c in _candidate_names(variant_of) if c != name))
    for candidate in candidates:
        final = outdir / candidate
        try:
            os.link(tmp, final)
            return final
        except FileExistsError:
            continue
        except OSError as e:
            if e.errno not in _NO_HARD_LINKS:
                raise
        if _publish_without_link(tmp, final):  # this file system has no hard links
            return final
    raise UserError(f"--outdir {outdir}: no free file name for {name}; move old images away")


def _publish_without_link(tmp: Path, final: Path) -> bool:
    """Fallback where hard links fail (vfat, exFAT, some network shares); False if `final`
    is taken. The finished, fsynced file is renamed to its name in one step, so the name
    never holds an empty or partial file, even if the process dies right there.

    Windows `os.rename` refuses to replace an existing file. Linux renames with
    RENAME_NOREPLACE (`renameat2`), which refuses too; where that call is missing, the name
    is checked just before a plain rename (names are planned per process, so no other
    process of the run writes the same name).
    """
    if os.name == "nt":
        try:
            os.rename(tmp, final)
            return True
        except FileExistsError:
            return False
    done = _rename_no_replace(tmp, final)
    if done is not None:
        return done
    if os.path.lexists(final):
        return False
    os.rename(tmp, final)
    return True


_RENAME_NOREPLACE = 1
_AT_FDCWD = -100


def _rename_no_replace(tmp: Path, final: Path) -> bool | None:
    """Linux `renameat2(..., RENAME_NOREPLACE)`: True when renamed, False when `final` exists,
    None where the call or the flag is not available (then the caller checks and renames)."""
    renameat2 = _libc_renameat2()
    if renameat2 is None:
        return None
    if renameat2(_AT_FDCWD, os.fsencode(tmp), _AT_FDCWD, os.fsencode(final), _RENAME_NOREPLACE) == 0:
        return True
    error = ctypes.get_errno()
    if error == errno.EEXIST:
        return False
    if error in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return None
    raise OSError(error, os.strerror(error), str(final))


@functools.cache
def _libc_renameat2():
    """The C library's `renameat2`, or None (not Linux, or a C library without it)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


def _fsync_dir(folder: Path) -> None:
    """Persist the new directory entry where the platform allows it (POSIX only)."""
    if os.name == "nt":
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
