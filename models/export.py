"""`pal export`: checkpoint -> self-contained ONNX scorer bundle (see models.bundle for the layout).

The graph is PooledEncoder (eager attention, so onnxruntime's BERT fusions recognise the attention pattern)
followed by the PAL head's user-independent maps. Users only enter through K weights at scoring time, so
scoring N users costs one encoder pass plus O(K d) numpy each. A hierarchical checkpoint's graph also outputs
`deviation` = V e(x) (R numbers per item, the basis applied to the pooled embedding), on which its users' R
unconstrained weights act.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel
from torch import nn

from models import bundle as B
from models import validation_sample
from models.checkpoint import MODEL_FILE, USER_IDS_FILE, USERS_FILE, load_model
from models.config import EncoderSpec
from models.deviation import DEVIATION_FILE
from models.embedder import ENCODER_GRAPH, ENCODER_SPEC_FILE
from models.encoder import PooledEncoder, load_tokenizer
from models.pal import PALHead

OPSET = 17
# fp32 graph vs torch on the self-check texts; fused kernels reorder sums, so not bit-exact.
FP32_TOLERANCE = 1e-3
FP16_TOLERANCE = 5e-2
# protobuf cannot serialise a message past 2 GiB; graphs with more weights than this keep them in a .data file.
EXTERNAL_DATA_BYTES = 1_800_000_000
FUSED_OPS = (
    "EmbedLayerNormalization",
    "Attention",
    "MultiHeadAttention",
    "SkipLayerNormalization",
    "LayerNormalization",
    "BiasGelu",
    "FastGelu",
    "Gelu",
    "GemmFastGelu",
)


class ExportError(ValueError):
    """The checkpoint cannot become a text scorer (e.g. a table encoder) or the exported graph is wrong."""


class ExportReport(BaseModel):
    bundle: str
    version: str
    form: str
    k: int
    deviation_rank: int | None = None  # a hierarchical model's rank
    encoder: str
    graphs: dict[str, str]
    fusions: dict[str, int]
    max_abs_diff: dict[str, float]
    files: dict[str, int]  # name -> bytes
    seconds: float


@dataclass(frozen=True)
class _Probe:
    """The batch every exported graph is checked on: token ids and mask, the graph's output names, and the torch
    graph's outputs for it (computed before tracing, from the untouched modules)."""

    ids: torch.Tensor
    mask: torch.Tensor
    output_names: list[str]
    reference: list[np.ndarray]


class ScoringGraph(nn.Module):
    """token ids + mask -> pooled embedding -> latent f(e) (and g_k(e) for PAL-B; and V e for a hierarchical
    model's deviation basis V (R, d)). Traced by torch.onnx."""

    def __init__(self, encoder: PooledEncoder, head: PALHead, basis: np.ndarray | None = None) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head
        self.basis: torch.Tensor | None
        self.register_buffer("basis", None if basis is None else torch.from_numpy(np.asarray(basis, np.float32)))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        e = self.encoder(input_ids, attention_mask)
        out: tuple[torch.Tensor, ...] = (self.head.latent(e),)
        if self.head.cfg.form == "B":
            out = (*out, self.head.prompt_prototypes(e))
        return out if self.basis is None else (*out, e @ self.basis.T)


def export_bundle(
    checkpoint: str | Path,
    out: str | Path,
    fp16: bool = False,
    external_data_bytes: int | None = None,
    validation: str | Path | None = None,
) -> ExportReport:
    """Write the bundle to `out` (replacing an earlier bundle there) and return what was exported.

    validation: comparisons to sample the bundle's validation sample from (models.validation_sample.load); by
    default the checkpoint's own sample, which training writes. Without one the bundle has none, and the service
    serves fp32 unless told otherwise (models/precision.py).

    external_data_bytes: weights above this size go to a `.data` file beside a decoder's graph (default: just under
    protobuf's 2 GB limit; tests lower it to exercise that layout on a tiny model)."""
    t0 = time.perf_counter()
    checkpoint, out = Path(checkpoint), Path(out)
    _check_target(out)
    model, ckpt = load_model(checkpoint)
    spec, cfg = ckpt.meta.encoder, ckpt.meta.pal
    if spec.kind != "hf":
        raise ExportError(
            f"checkpoint {checkpoint} was trained on a {spec.kind!r} encoder (fixed embedding table, e.g. the "
            "simulated data set); only checkpoints trained on a transformers text encoder can be exported"
        )
    encoder = PooledEncoder(spec, attn_implementation="eager")
    _check_dims(encoder, spec, cfg.form, cfg.item_dim, cfg.prompt_dim)
    deviation = ckpt.deviation
    graph = ScoringGraph(encoder, model.head, None if deviation is None else deviation.basis).eval()
    tokenizer = load_tokenizer(spec)
    tokenizer.truncation_side = spec.truncation_side
    check_ids, check_mask = _self_check_batch(tokenizer, spec)
    with torch.no_grad():  # reference before tracing, from the untouched torch modules
        reference = [t.numpy() for t in graph(check_ids, check_mask)]
    output_names = B.expected_outputs(cfg, ckpt.meta.deviation_rank)
    probe = _Probe(check_ids, check_mask, output_names, reference)

    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        # The unfused export is kept as the portable graph: OpenVINO runs standard ONNX ops, not onnxruntime's
        # fused com.microsoft ones (given the fused graph it splits it with the CPU provider and runs slower).
        if spec.pooling == "last":  # decoder-only backbone
            graphs, fusions, diffs = _export_decoder(graph, probe, work, fp16, external_data_bytes)
        else:
            graphs, fusions, diffs = _export_encoder(graph, probe, work, fp16)
        shutil.copyfile(checkpoint / MODEL_FILE, work / B.HEAD_FILE)
        shutil.copyfile(checkpoint / USERS_FILE, work / B.USERS_FILE)
        shutil.copyfile(checkpoint / USER_IDS_FILE, work / B.USER_IDS_FILE)
        if deviation is not None:
            shutil.copyfile(checkpoint / DEVIATION_FILE, work / DEVIATION_FILE)
        pairs = _validation_pairs(checkpoint, validation)
        if pairs:
            validation_sample.write(work, pairs)
        tokenizer.save_pretrained(str(work / B.TOKENIZER_DIR))
        if not (work / B.TOKENIZER_DIR / B.TOKENIZER_FILE).is_file():
            raise ExportError(f"encoder {spec.name_or_path!r} has no fast tokenizer (tokenizer.json)")
        meta = B.BundleMeta(
            version="",  # set by seal(), from everything below and the files' digests
            checkpoint_version=ckpt.meta.version,
            pal=cfg,
            encoder=spec,
            prior_weights=ckpt.meta.prior_weights,
            prior_strength=ckpt.meta.prior_strength,
            output_names=output_names,
            fusions=fusions,
            graphs=graphs,
            chat_template=getattr(tokenizer, "chat_template", None) or None,
            opset=OPSET,
            created_at=datetime.now(UTC).isoformat(timespec="seconds"),
            export_max_abs_diff=diffs,
            metrics=ckpt.meta.metrics,
            deviation_rank=ckpt.meta.deviation_rank,
        )
        meta = B.seal(work, meta)
        # Swap in whole: a reader never sees a half-written bundle under `out`.
        if out.exists():
            previous = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
            out.rename(previous / "bundle")
            work.rename(out)
            shutil.rmtree(previous, ignore_errors=True)
        else:
            work.rename(out)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    files = {p.relative_to(out).as_posix(): p.stat().st_size for p in sorted(out.rglob("*")) if p.is_file()}
    return ExportReport(
        bundle=str(out),
        version=meta.version,
        form=cfg.form,
        k=cfg.k,
        deviation_rank=meta.deviation_rank,
        encoder=spec.name_or_path,
        graphs=graphs,
        fusions=fusions,
        max_abs_diff=diffs,
        files=files,
        seconds=round(time.perf_counter() - t0, 2),
    )


def _export_encoder(
    graph: ScoringGraph, probe: _Probe, work: Path, fp16: bool
) -> tuple[dict[str, str], dict[str, int], dict[str, float]]:
    """BERT-style encoders: the unfused graph (portable) and onnxruntime's fused one (fp32, optional fp16)."""
    # The unfused export is kept as the portable graph: OpenVINO runs standard ONNX ops, not onnxruntime's
    # fused com.microsoft ones (given the fused graph it splits it with the CPU provider and runs slower).
    portable = work / B.GRAPH_PORTABLE
    _torch_export(graph, probe, portable)
    optimized, fusions = _optimize(portable, graph.encoder)
    optimized.save_model_to_file(str(work / B.GRAPH_FP32))
    graphs = {"fp32": B.GRAPH_FP32, "portable": B.GRAPH_PORTABLE}
    diffs = {name: _max_diff(work / graphs[name], probe) for name in graphs}
    for name, diff in diffs.items():
        if diff > FP32_TOLERANCE:
            raise ExportError(f"exported {name} graph differs from torch by {diff:.2e} > {FP32_TOLERANCE}")
    if fp16:
        optimized.convert_float_to_float16(keep_io_types=True)
        optimized.save_model_to_file(str(work / B.GRAPH_FP16))
        graphs["fp16"] = B.GRAPH_FP16
        diffs["fp16"] = _check_fp16(work / B.GRAPH_FP16, probe)
    return graphs, fusions, diffs


def _export_decoder(
    graph: ScoringGraph, probe: _Probe, work: Path, fp16: bool, external_data_bytes: int | None = None
) -> tuple[dict[str, str], dict[str, int], dict[str, float]]:
    """Decoder-only backbones: one standard-op graph (onnxruntime's BERT fusions do not apply), which is also the
    portable one; weights go to `<graph>.data` beside it once they pass the 2 GB protobuf limit."""
    import onnx

    limit = EXTERNAL_DATA_BYTES if external_data_bytes is None else external_data_bytes
    raw = work / ".raw" / B.GRAPH_FP32  # the exporter may scatter one file per tensor here for large models
    raw.parent.mkdir()
    _torch_export(graph, probe, raw)
    model = onnx.load(str(raw))  # pulls any external tensors back in
    shutil.rmtree(raw.parent)
    large = _initializer_bytes(model) > limit
    _save_onnx(model, work / B.GRAPH_FP32, limit)  # moves the weights out of `model` when large
    del model
    graphs = {"fp32": B.GRAPH_FP32, "portable": B.GRAPH_FP32}
    diffs = {"fp32": _max_diff(work / B.GRAPH_FP32, probe)}
    if diffs["fp32"] > FP32_TOLERANCE:
        raise ExportError(f"exported fp32 graph differs from torch by {diffs['fp32']:.2e} > {FP32_TOLERANCE}")
    if fp16:
        from onnxruntime.transformers.float16 import convert_float_to_float16

        # Shape inference serialises the model, which protobuf refuses past 2 GB.
        model = onnx.load(str(work / B.GRAPH_FP32))
        half = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=large)
        _save_onnx(half, work / B.GRAPH_FP16, limit)
        graphs["fp16"] = B.GRAPH_FP16
        diffs["fp16"] = _check_fp16(work / B.GRAPH_FP16, probe)
    return graphs, {}, diffs


def _initializer_bytes(model) -> int:  # model: onnx.ModelProto
    from onnx.helper import tensor_dtype_to_np_dtype

    return sum(int(np.prod(t.dims)) * tensor_dtype_to_np_dtype(t.data_type).itemsize for t in model.graph.initializer)


def _save_onnx(model, path: Path, external_data_bytes: int) -> None:
    """One self-contained .onnx file, or, past the limit, the graph plus all weights in one `<name>.data` file
    (onnxruntime finds it beside the graph)."""
    import onnx

    if _initializer_bytes(model) > external_data_bytes:
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=f"{path.name}.data",
            size_threshold=1024,
        )
    else:
        onnx.save_model(model, str(path))


def _check_fp16(path: Path, probe: _Probe) -> float:
    diff = _max_diff(path, probe)
    if not np.isfinite(diff) or diff > FP16_TOLERANCE * max(1.0, _scale(probe.reference)):
        raise ExportError(f"fp16 graph differs from torch by {diff:.2e}")
    return diff


def _validation_pairs(checkpoint: Path, validation: str | Path | None) -> list[validation_sample.ValidationPair]:
    """The sample the bundle carries: drawn from `validation` if given, else the checkpoint's own (if any)."""
    try:
        if validation is not None:
            return validation_sample.sample(validation_sample.load(validation))
        return validation_sample.sample(validation_sample.read(checkpoint) or [])
    except validation_sample.ValidationSampleError as e:
        raise ExportError(str(e)) from e


def _check_target(out: Path) -> None:
    """Refuse to replace a directory that is not an earlier bundle (a typo must not delete someone's data)."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not _is_bundle(out))):
        raise ExportError(f"{out} exists and is not a scorer bundle; choose another output directory")


def _is_bundle(path: Path) -> bool:
    try:
        return json.loads((path / B.CONFIG_FILE).read_text()).get("format") == B.FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _check_dims(encoder: PooledEncoder, spec: EncoderSpec, form: str, item_dim: int, prompt_dim: int) -> None:
    dims = {"item_dim": item_dim} if form == "A" else {"item_dim": item_dim, "prompt_dim": prompt_dim}
    for name, d in dims.items():
        if d != encoder.dim:
            raise ExportError(f"head {name}={d} but encoder {spec.name_or_path!r} embeds in {encoder.dim} dims")
    max_pos = getattr(encoder.model.config, "max_position_embeddings", None)
    if max_pos is not None and spec.max_length > max_pos:
        raise ExportError(f"max_length={spec.max_length} exceeds the encoder's {max_pos} positions")


def _self_check_batch(tokenizer, spec: EncoderSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """A padded batch of varied lengths (one cut to max_length) used to trace and to check the graph."""
    texts = [
        "",
        "short prompt",
        "a somewhat longer response that says a few more things. " * 3,
        "a text long enough to be truncated " * (spec.max_length // 4 + 4),
    ]
    enc = tokenizer(texts, truncation=True, max_length=spec.max_length, padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def _torch_export(graph: nn.Module, probe: _Probe, path: Path) -> None:
    axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}}
    axes.update({name: {0: "batch"} for name in probe.output_names})
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated upstream, but its graphs are the ones onnxruntime's BERT
        # optimizer fuses into Attention/SkipLayerNormalization; the dynamo exporter's are not (yet).
        warnings.simplefilter("ignore")
        torch.onnx.export(
            graph,
            (probe.ids, probe.mask),
            str(path),
            input_names=["input_ids", "attention_mask"],
            output_names=probe.output_names,
            dynamic_axes=axes,
            opset_version=OPSET,
            dynamo=False,
            do_constant_folding=True,
        )


def _optimize(path: Path, encoder: PooledEncoder):  # -> (onnxruntime OnnxModel, fusion counts)
    from onnxruntime.transformers import optimizer

    cfg = encoder.model.config
    model = optimizer.optimize_model(
        str(path),
        model_type="bert",
        num_heads=int(cfg.num_attention_heads),
        hidden_size=int(cfg.hidden_size),
        opt_level=0,
        use_gpu=False,
    )
    stats = model.get_fused_operator_statistics()
    return model, {op: int(stats[op]) for op in FUSED_OPS if stats.get(op)}


def _max_diff(path: Path, probe: _Probe) -> float:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input_ids": probe.ids.numpy(), "attention_mask": probe.mask.numpy()})
    return float(max(np.abs(g.astype(np.float64) - r).max() for g, r in zip(got, probe.reference, strict=True)))


def _scale(reference: list[np.ndarray]) -> float:
    return float(max(np.abs(r).max() for r in reference))


# --- the encoder alone, for training's embedding stage (models.embedder) -------------------------------------------

EMBEDDING_OUTPUT = "embedding"


def export_encoder(spec: EncoderSpec, out: str | Path) -> Path:
    """Write the pooled encoder alone (token ids + mask -> embedding) as an ONNX graph with its tokenizer, for
    embedding training data with onnxruntime (CUDA when present) instead of torch. The graph is onnxruntime's fused
    one for BERT-style encoders (checked against torch like a bundle's), the plain export for decoders. Written to
    a temporary folder and renamed, so a concurrent reader sees the whole export or none."""
    out = Path(out)
    if (out / ENCODER_SPEC_FILE).is_file():
        return out
    encoder = PooledEncoder(spec, attn_implementation="eager").eval()
    tokenizer = load_tokenizer(spec)
    tokenizer.truncation_side = spec.truncation_side
    ids, mask = _self_check_batch(tokenizer, spec)
    with torch.no_grad():
        probe = _Probe(ids, mask, [EMBEDDING_OUTPUT], [encoder(ids, mask).numpy()])
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        raw = work / "raw.onnx"
        _torch_export(encoder, probe, raw)
        if spec.pooling == "last":
            raw.rename(work / ENCODER_GRAPH)
        else:
            optimized, _ = _optimize(raw, encoder)
            optimized.save_model_to_file(str(work / ENCODER_GRAPH))
            raw.unlink()
        diff = _max_diff(work / ENCODER_GRAPH, probe)
        if diff > FP32_TOLERANCE:
            raise ExportError(f"exported encoder graph differs from torch by {diff:.2e} > {FP32_TOLERANCE}")
        tokenizer.save_pretrained(str(work / B.TOKENIZER_DIR))
        (work / ENCODER_SPEC_FILE).write_text(spec.model_dump_json(indent=2))
        try:
            work.rename(out)
        except OSError:  # another process exported it first: theirs is as good
            if not (out / ENCODER_SPEC_FILE).is_file():
                raise
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    return out
