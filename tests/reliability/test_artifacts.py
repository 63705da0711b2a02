"""Malformed or malicious model files: a clear error at load naming the file, and never code execution.

A pickle planted where weights are expected would, if anything unpickled it, create a marker file; the loaders
only read safetensors, ONNX and JSON, so the marker must never appear — through the scorer, the checkpoint
reader, the torch loader, export, and `pal serve` as a real process.
"""

from __future__ import annotations

import builtins
import io
import pickle
import shutil
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from models import bundle as B
from models import checkpoint as C
from models.bundle import BundleError
from models.providers.openvino import runs_here as openvino_runs_here
from tests.reliability.procs import REPO
from tests.scorer.factory import copy_bundle


class _Payload:
    """Unpickling this opens (creates) the marker file: the proof of code execution."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return builtins.open, (str(self.marker), "w")


def _pickles(marker: Path) -> dict[str, bytes]:
    plain = {p: pickle.dumps({"weights": _Payload(marker)}, protocol=p) for p in (2, 4, 5)}
    torch_like = io.BytesIO()  # the zip layout torch.save writes, with the payload in data.pkl
    with zipfile.ZipFile(torch_like, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps(_Payload(marker), protocol=2))
        z.writestr("archive/version", "3\n")
    return {**{f"pickle-{p}": data for p, data in plain.items()}, "torch-zip": torch_like.getvalue()}


def _plant(path: Path, data: bytes) -> None:
    if path.is_symlink() or path.exists():
        path.unlink()
    path.write_bytes(data)


def _load_bundle(path: Path, provider: str = "cpu"):
    from models.scorer import Scorer

    return Scorer.load(path, provider=provider, intra_op_threads=1)


def test_the_planted_payload_is_live(tmp_path: Path) -> None:
    """Control: unpickling the payload does create the marker, so its absence below means nothing unpickled it."""
    marker = tmp_path / "PWNED"
    pickle.loads(_pickles(marker)["pickle-5"])
    assert marker.exists()


BUNDLE_TARGETS = [
    B.HEAD_FILE,
    B.USERS_FILE,
    B.GRAPH_FP32,
    B.GRAPH_PORTABLE,
    f"{B.TOKENIZER_DIR}/{B.TOKENIZER_FILE}",
    B.CONFIG_FILE,
]


@pytest.mark.parametrize("target", BUNDLE_TARGETS)
def test_pickle_planted_in_a_bundle_is_refused_without_running_it(target: str, bundle: Path, tmp_path: Path) -> None:
    if target == B.GRAPH_PORTABLE and not openvino_runs_here():
        pytest.skip("the portable graph is read by the OpenVINO provider, which does not run on this machine")
    marker = tmp_path / "PWNED"
    for kind, data in _pickles(marker).items():
        copy = copy_bundle(bundle, tmp_path / kind)
        _plant(copy / target, data)
        with pytest.raises(BundleError) as err:
            # The portable graph is what the OpenVINO provider reads; every other file, every provider reads.
            _load_bundle(copy, provider="openvino" if target == B.GRAPH_PORTABLE else "cpu")
        assert Path(target).name.split(".")[0] in str(err.value) or "config" in str(err.value), str(err.value)
        assert not marker.exists(), f"unpickled {kind} planted as {target}"


@pytest.mark.parametrize("target", [C.MODEL_FILE, C.USERS_FILE, C.USER_IDS_FILE, C.CONFIG_FILE])
def test_pickle_planted_in_a_checkpoint_is_refused_by_every_reader(target: str, bundle: Path, tmp_path: Path) -> None:
    from models.export import ExportError, export_bundle

    marker = tmp_path / "PWNED"
    source = bundle.parent / "checkpoint-B"
    for kind, data in _pickles(marker).items():
        ckpt = tmp_path / kind
        shutil.copytree(source, ckpt)
        _plant(ckpt / target, data)
        with pytest.raises(C.CheckpointError):
            C.read_checkpoint(ckpt)
        with pytest.raises(C.CheckpointError):
            C.load_model(ckpt)  # the torch path reads the same safetensors, never torch.load
        with pytest.raises((C.CheckpointError, ExportError)):
            export_bundle(ckpt, tmp_path / f"out-{kind}")
        assert not marker.exists(), f"unpickled {kind} planted as {target}"


def _truncations(data: bytes) -> dict[str, bytes]:
    header_len = struct.unpack("<Q", data[:8])[0]
    return {
        "empty": b"",
        "7 bytes": data[:7],
        "header cut": data[: 8 + header_len // 2],
        "tensors cut": data[: len(data) // 2 + 8 + header_len // 2],
        "one byte short": data[:-1],
        "huge header length": struct.pack("<Q", 2**62) + data[8:],
        "header not json": data[:8] + b"\xff" * header_len + data[8 + header_len :],
    }


@pytest.mark.parametrize("target", [B.HEAD_FILE, B.USERS_FILE])
def test_truncated_or_corrupt_safetensors_are_clear_errors(target: str, bundle: Path, tmp_path: Path) -> None:
    for why, data in _truncations((bundle / target).read_bytes()).items():
        copy = copy_bundle(bundle, tmp_path / why.replace(" ", "-"))
        _plant(copy / target, data)
        with pytest.raises(BundleError, match=target.split(".")[0]):
            _load_bundle(copy)


def test_truncated_checkpoint_weights_are_clear_errors(bundle: Path, tmp_path: Path) -> None:
    source = bundle.parent / "checkpoint-B"
    for target in (C.MODEL_FILE, C.USERS_FILE):
        for why, data in _truncations((source / target).read_bytes()).items():
            ckpt = tmp_path / f"{target}-{why.replace(' ', '-')}"
            shutil.copytree(source, ckpt)
            _plant(ckpt / target, data)
            with pytest.raises(C.CheckpointError):
                C.read_checkpoint(ckpt)


def test_truncated_and_garbage_onnx_graphs_are_clear_errors(bundle: Path, tmp_path: Path) -> None:
    with open(bundle / B.GRAPH_FP32, "rb") as f:
        head = f.read(1 << 20)
    for why, data in {"truncated": head, "garbage": b"\x08\x07garbage" * 1000, "empty": b""}.items():
        copy = copy_bundle(bundle, tmp_path / why)
        _plant(copy / B.GRAPH_FP32, data)
        with pytest.raises(BundleError, match="ONNX|onnx|model"):
            _load_bundle(copy)


def _serve_fails(bundle: Path) -> str:
    """Run the real entry point, `pal serve BUNDLE`, on the CPU provider; assert it exits with an error before
    serving (port 1 is never reached) and return its stderr."""
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "PAL_PROVIDER": "cpu", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "training.cli", "serve", str(bundle), "--port", "1"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode != 0, proc.stderr[-2000:]
    return proc.stderr


def test_pal_serve_refuses_a_poisoned_bundle_and_exits(bundle: Path, tmp_path: Path) -> None:
    """The real entry point: a pickle as head weights stops `pal serve` with an error naming the file and why."""
    marker = tmp_path / "PWNED"
    copy = copy_bundle(bundle, tmp_path / "poisoned")
    _plant(copy / B.HEAD_FILE, _pickles(marker)["pickle-5"])
    stderr = _serve_fails(copy)
    assert f"poisoned/{B.HEAD_FILE}" in stderr and "not a readable safetensors" in stderr, stderr[-2000:]
    assert not marker.exists()


# --- issue 16, Low 12: the version binds every file and setting that changes a reward -------------------------


def _negate_head(path: Path) -> None:
    from safetensors.numpy import load_file, save_file

    arrays = load_file(str(path))
    # The head's weight matrices and biases, not its temperature: every reward changes, nothing turns invalid.
    save_file({k: v if "tau" in k else -v for k, v in arrays.items()}, str(path))


def _permute_tokenizer(path: Path) -> None:
    import json

    tok = json.loads(path.read_text())
    vocab = tok["model"]["vocab"]
    a, b = "the", "and"
    vocab[a], vocab[b] = vocab[b], vocab[a]
    path.write_text(json.dumps(tok))


def _edit_config(path: Path, **encoder: object) -> None:
    import json

    meta = json.loads(path.read_text())
    meta["encoder"].update(encoder)
    path.write_text(json.dumps(meta))


# Well-formed changes that change rewards: each used to load under the unchanged version (stored fits reused).
CONTENT_EDITS = {
    "negated head": (B.HEAD_FILE, lambda d: _negate_head(d / B.HEAD_FILE)),
    "permuted tokenizer": (B.TOKENIZER_FILE, lambda d: _permute_tokenizer(d / B.TOKENIZER_DIR / B.TOKENIZER_FILE)),
    "other users": (B.USER_IDS_FILE, lambda d: (d / B.USER_IDS_FILE).write_text('["a", "b", "c", "d"]')),
    "shorter max_length": ("version", lambda d: _edit_config(d / B.CONFIG_FILE, max_length=32)),
}


@pytest.mark.parametrize("edit", sorted(CONTENT_EDITS))
def test_a_bundle_changed_after_export_is_refused_and_resealed_gets_a_new_version(
    edit: str, bundle: Path, tmp_path: Path
) -> None:
    names, change = CONTENT_EDITS[edit]
    copy = copy_bundle(bundle, tmp_path / "copy")
    change(copy)
    with pytest.raises(BundleError, match=names):
        _load_bundle(copy)
    # The same change made on purpose and re-sealed: it loads, under another version than the original.
    B.seal(copy)
    assert _load_bundle(copy).meta.version != B.read_meta(bundle).version


def test_a_bundle_without_digests_is_refused(bundle: Path, tmp_path: Path) -> None:
    import json

    copy = copy_bundle(bundle, tmp_path / "old")
    meta = json.loads((copy / B.CONFIG_FILE).read_text())
    meta["digests"] = {}
    (copy / B.CONFIG_FILE).write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="re-export"):
        _load_bundle(copy)


@pytest.fixture
def long_max_length_bundle(bundle: Path, tmp_path: Path) -> Path:
    """max_length 8192 on MiniLM (512 positions), sealed as an export would write it."""
    copy = copy_bundle(bundle, tmp_path / "long")
    _edit_config(copy / B.CONFIG_FILE, max_length=8192)
    B.seal(copy)
    return copy


def test_a_max_length_past_the_graph_fails_at_load(long_max_length_bundle: Path) -> None:
    with pytest.raises(BundleError, match="max_length=8192"):
        _load_bundle(long_max_length_bundle)


def test_pal_serve_exits_on_a_max_length_past_the_graph(long_max_length_bundle: Path) -> None:
    """Before: the bundle loaded, warmup failed with a raw onnxruntime error and the server answered 503 forever."""
    stderr = _serve_fails(long_max_length_bundle)
    assert "max_length=8192" in stderr, stderr[-2000:]
