"""Which images a bulk job segments, and reading them: a folder (every image file under it), a glob, a list
file (one path or URI a line), or one image; local paths, or URIs of any filesystem pyarrow reaches.

Each image is named by its ``key`` (an absolute local path or the URI, what resume matches on) and a
``file_name`` relative to the source's root, as COCO's ``images[].file_name`` (and a data set's ground
truth) names it. pyarrow is imported only for URIs.
"""

from __future__ import annotations

import fnmatch
import glob
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pyarrow.fs import FileSystem

# The file types the server decodes (service/core/images.py's SUPPORTED_FORMATS), by their usual suffixes.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
WILDCARDS = "*?["


class SourceError(ValueError):
    """The source names no images, or cannot be listed."""


@dataclass(frozen=True, order=True)
class Image:
    key: str  # absolute local path or URI: what the job reads and what resume matches on
    file_name: str  # relative to the source's root


def is_uri(text: str) -> bool:
    return "://" in text and not text.startswith("file://")


def filesystem(uri: str) -> tuple[FileSystem, str]:
    """pyarrow's filesystem of ``uri`` and the path inside it."""
    from pyarrow.fs import FileSystem

    fs, path = FileSystem.from_uri(uri)
    return fs, path


def read_bytes(key: str) -> bytes:
    """The file's bytes; OSError (pyarrow's errors are OSErrors too) when it cannot be read."""
    if not is_uri(key):
        return Path(key).read_bytes()
    fs, path = filesystem(key)
    with fs.open_input_file(path) as f:
        return bytes(f.read())


def is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


def list_images(source: str) -> list[Image]:
    """The images ``source`` names, sorted by key, each once; SourceError if none."""
    try:
        images = _uri_images(source) if is_uri(source) else _local_images(source)
    except OSError as exc:
        raise SourceError(f"{source}: cannot be listed ({exc})") from None
    if not images:
        raise SourceError(f"{source}: no images (expected a folder, a glob, a list file or an image: "
                          f"{', '.join(IMAGE_SUFFIXES)})")
    return sorted(set(images))


def _local_images(source: str) -> list[Image]:
    path = Path(source.removeprefix("file://")).absolute()
    if any(c in source for c in WILDCARDS):
        root = _glob_root(str(path))
        return [Image(p, os.path.relpath(p, root)) for p in glob.glob(str(path), recursive=True) if is_image(p)]
    if path.is_dir():
        return [Image(str(p), str(p.relative_to(path))) for p in path.rglob("*") if p.is_file() and is_image(p.name)]
    if path.is_file():
        return [Image(str(path), path.name)] if is_image(path.name) else _listed(path.read_text(), str(path.parent))
    raise SourceError(f"{source}: no such file or folder")


def _uri_images(source: str) -> list[Image]:
    from pyarrow.fs import FileSelector, FileType

    fs, path = filesystem(source)
    scheme = source[: source.index("://") + 3]
    if any(c in path for c in WILDCARDS):
        root = _glob_root(path)
        found = fs.get_file_info(FileSelector(root, recursive=True))
        return [Image(scheme + f.path, posix_relative(f.path, root)) for f in found
                if f.type == FileType.File and fnmatch.fnmatch(f.path, path) and is_image(f.path)]
    info = fs.get_file_info(path)
    if info.type == FileType.Directory:
        found = fs.get_file_info(FileSelector(path, recursive=True))
        return [Image(scheme + f.path, posix_relative(f.path, path)) for f in found
                if f.type == FileType.File and is_image(f.path)]
    if info.type == FileType.File:
        if is_image(path):
            return [Image(source, path.rsplit("/", 1)[-1])]
        with fs.open_input_file(path) as f:
            return _listed(bytes(f.read()).decode(), scheme + path.rsplit("/", 1)[0])
    raise SourceError(f"{source}: no such file or folder")


def _listed(text: str, base: str) -> list[Image]:
    """A list file's images: one path or URI a line (relative paths from the list's folder); blank lines and
    ``#`` comments skipped. Every line counts, image suffix or not: a bad line is a failure to report."""
    images = []
    for line in text.splitlines():
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        if is_uri(entry):
            images.append(Image(entry, entry.rsplit("/", 1)[-1]))
        elif is_uri(base):
            images.append(Image(f"{base}/{entry}", entry))
        else:
            images.append(Image(os.path.abspath(os.path.join(base, entry)), entry))
    return images


def _glob_root(pattern: str) -> str:
    """The folder above a glob's first wildcard: what file names are relative to."""
    parts = pattern.split("/")
    fixed = next(i for i, part in enumerate(parts) if any(c in part for c in WILDCARDS))
    return "/".join(parts[:fixed]) or "/"


def posix_relative(path: str, root: str) -> str:
    return path[len(root):].lstrip("/") if path.startswith(root) else path
