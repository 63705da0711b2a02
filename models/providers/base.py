"""The execution-provider contract: everything the scorer needs to know about one onnxruntime device backend.

A provider says which precisions it runs, which of the bundle's graphs it runs them on, how it likes its batches
(token budget, padding tolerance, width rounding), whether it can start on this machine, and how to open a
session. Adding one is one module in this package plus one line in `models/providers/__init__.py`
(docs/ARCHITECTURE.md shows it). Nothing here imports onnxruntime at import time: the settings read this
registry, and they must stay cheap to import.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from models.bundle import BundleError, BundleMeta

if TYPE_CHECKING:
    import onnxruntime as ort

log = logging.getLogger("models.scorer")


class ProviderError(RuntimeError):
    """The requested execution provider cannot run here: raised at load, never a silent fallback."""


class ExecutionProvider(ABC):
    name: ClassVar[str]  # the PAL_PROVIDER value
    label: ClassVar[str]  # how messages name it
    ort_name: ClassVar[str]  # onnxruntime's name, what Scorer.provider and /info report
    description: ClassVar[str]  # one line for the settings table
    precisions: ClassVar[tuple[str, ...]]
    # The precisions the service may pick by measured fidelity (models/precision.py), fastest first (from bench/);
    # one missing here is served only when asked for by name.
    fast_first: ClassVar[tuple[str, ...]] = ("fp32",)
    # Padded tokens per encoder batch when the caller sets none.
    batch_tokens: ClassVar[int]
    # A row that would get more padding than this starts a new batch; None: rows of any length share a batch.
    pad_tolerance: ClassVar[int | None] = 8
    # Batch widths are rounded up to a multiple of this (providers that build kernels per shape want few shapes).
    width_multiple: ClassVar[int] = 1

    def graph(self, precision: str) -> str:
        """The key in BundleMeta.graphs of the graph this provider runs at `precision`."""
        return precision

    def unavailable(self, precision: str) -> str | None:
        """Why this provider cannot run `precision` on this machine (cheap checks only), or None."""
        return None

    def require(self, precision: str) -> None:
        """ProviderError saying why, where this provider cannot run `precision` here."""
        reason = self.unavailable(precision)
        if reason:
            raise ProviderError(reason)

    def active(self, session: ort.InferenceSession) -> ort.InferenceSession:
        """`session`, refused unless onnxruntime runs it on this provider: it falls back to CPU with only a log
        line (CUDA or cuDNN libraries missing, a node OpenVINO cannot run)."""
        if session.get_providers()[0] != self.ort_name:
            raise ProviderError(f"provider={self.name!r} requested but onnxruntime activated {session.get_providers()}")
        return session

    @abstractmethod
    def open(self, path: Path, precision: str, threads: int, spinning: bool) -> ort.InferenceSession:
        """A session on this provider; ProviderError if it does not start, BundleError if the graph is bad.

        What the scorer uses of it: get_providers()[0] (its name), get_inputs() (.name) and run(output_names,
        feed) -> list of arrays; a provider outside onnxruntime returns an object with those three."""

    def graph_path(self, directory: Path, meta: BundleMeta, precision: str) -> Path:
        key = self.graph(precision)
        name = meta.graphs.get(key)
        if name is None:
            hint = "re-export it with `pal export`" + (" --fp16" if key == "fp16" else "")
            raise BundleError(f"bundle {directory} has no {key} graph for the {self.label} provider; {hint}")
        path = directory / name
        if not path.is_file():
            raise BundleError(f"bundle {directory} has no {name}")
        return path


def native_session(
    path: Path, providers: list[str], threads: int, spinning: bool
) -> ort.InferenceSession:
    """A session on onnxruntime's own providers (CPU, CUDA); BundleError when the file is not a graph."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # By default idle intra-op threads sleep instead of spin-waiting: the scorer shares its cores with tokenization,
    # the event loop and other processes, and with one busy process beside it spinning measured ~30% slower (2
    # cores). On dedicated cores spinning makes a single short text ~20% faster (docs/SCORER.md). Threads stop
    # spinning when a run ends either way, so an idle service burns no CPU.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    opts.add_session_config_entry("session.force_spinning_stop", "1")
    return ort.InferenceSession(str(path), sess_options=opts, providers=providers)
