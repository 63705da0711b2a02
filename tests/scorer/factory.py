"""Real exported bundles for tests: random PAL head weights on the real MiniLM encoder.

Other test suites import `make_random_bundle` to get a bundle the scorer and the service can load. Export
takes a few seconds (tracing + onnxruntime fusion), so call it from a session-scoped fixture.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from models.config import EncoderSpec, PALConfig


def make_random_checkpoint(
    directory: str | Path, form: str = "B", k: int = 3, n_users: int = 4, max_length: int = 128, seed: int = 0
) -> Path:
    """A checkpoint with a small random PAL head (latent 16, hidden 32) over MiniLM's 384-d embeddings."""
    import torch

    from models.checkpoint import save_checkpoint
    from models.pal import PALModel

    cfg = PALConfig(form=form, k=k, prompt_dim=384, item_dim=384, latent_dim=16, hidden_dim=32, n_hidden=1)
    model = PALModel(cfg, n_users=n_users, seed=seed)
    gen = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        # Non-zero biases and spread-out user logits, so every parameter and every user matters in parity checks.
        for name, p in model.named_parameters():
            if ".b" in name or name == "user_logits":
                p.add_(torch.randn(p.shape, generator=gen))
    directory = Path(directory)
    save_checkpoint(directory, model, [f"user-{i}" for i in range(n_users)], EncoderSpec(max_length=max_length))
    return directory


def copy_bundle(bundle: Path, dest: Path) -> Path:
    """A bundle copy a test may damage; its graphs are symlinks (they are ~90 MB) unless the test replaces them."""
    dest.mkdir(parents=True)
    for p in bundle.iterdir():
        if p.suffix == ".onnx":
            (dest / p.name).symlink_to(p)
        elif p.is_dir():
            shutil.copytree(p, dest / p.name)
        else:
            shutil.copy(p, dest / p.name)
    return dest


# The shared test bundles' max_length: short enough that a few test sentences get truncated, so every suite
# covers the truncation path cheaply.
RANDOM_BUNDLE_MAX_LENGTH = 64


def make_random_bundle(
    tmp_dir: str | Path, form: str = "B", k: int = 3, max_length: int = 128, fp16: bool = False
) -> Path:
    """Checkpoint + `pal export` into tmp_dir; returns the bundle directory (tmp_dir/bundle-<form>)."""
    from models.export import export_bundle

    tmp_dir = Path(tmp_dir)
    ckpt = make_random_checkpoint(tmp_dir / f"checkpoint-{form}", form=form, k=k, max_length=max_length)
    out = tmp_dir / f"bundle-{form}"
    export_bundle(ckpt, out, fp16=fp16)
    return out


def make_hier_bundles(
    tmp_dir: str | Path, rank: int = 2, n_users: int = 4, max_length: int = 64, seed: int = 0
) -> tuple[Path, Path]:
    """A random K=1 PAL-B checkpoint exported twice: as is (the global model) and as a hierarchical model with a
    random rank-R deviation basis (training.hierarchical.write_hier_checkpoint, as `pal eval` writes it). Returns
    (the K=1 bundle, the hier bundle); their checkpoints sit beside them (checkpoint-B, checkpoint-hier)."""
    import numpy as np

    from models.export import export_bundle
    from training.hierarchical import DeviationModel, write_hier_checkpoint

    tmp_dir = Path(tmp_dir)
    k1 = make_random_checkpoint(tmp_dir / "checkpoint-B", form="B", k=1, n_users=n_users, max_length=max_length)
    rng = np.random.default_rng(seed)
    users = {f"user-{i}": rng.normal(size=rank) for i in range(n_users)}
    model = DeviationModel(
        basis=rng.normal(size=(rank, 384)), user_weights=users, prior_mean=np.zeros(rank),
        precision=np.linspace(1.0, 2.0, rank), best_epoch=5, val_accuracy=0.6,
    )
    hier = write_hier_checkpoint(k1, model, tmp_dir / "checkpoint-hier")
    export_bundle(k1, tmp_dir / "bundle-k1")
    export_bundle(hier, tmp_dir / "bundle-hier")
    return tmp_dir / "bundle-k1", tmp_dir / "bundle-hier"
