"""The served precision, chosen by measured fidelity: the fastest precision the provider offers that keeps enough of
the checkpoint's own validation decisions.

A decision is one validation comparison (user, prompt, chosen, rejected) scored with that user's weights (a seen
user's, else the population prior): chosen above rejected or not. For each precision the provider offers besides
fp32, the scorer counts the decisions it makes as fp32 does (its agreement) and serves the fastest whose agreement
is at least `min_agreement` (PAL_PRECISION_MIN_AGREEMENT); fp32 keeps every decision by definition. "Fastest" is the
provider's own order (ExecutionProvider.fast_first, from bench/): bf16 before fp32 on OpenVINO, fp16 before fp32 on
CUDA. The measurement is cached per (bundle version, provider, hardware), so a restart does not measure again.

An explicit precision (PAL_PRECISION=fp32|bf16|fp16) overrides; a bundle without a validation sample (exported
before it existed, or from a checkpoint without one) serves fp32, as before, and says so.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from models import validation_sample
from models.bundle import BundleError
from models.providers.base import ProviderError

if TYPE_CHECKING:
    from models.scorer import Scorer

log = logging.getLogger("models.scorer")

AUTO = "auto"
REFERENCE = "fp32"
DEFAULT_MIN_AGREEMENT = 0.995


@dataclass(frozen=True)
class PrecisionChoice:
    """What /info reports: the precision served, why, and the measured agreement per precision (fp32 = 1.0)."""

    precision: str
    # override (PAL_PRECISION named one), measured (now), cached (an earlier measurement), only (the provider
    # runs nothing faster than fp32 here), no-sample (the bundle has no validation sample), given (a scorer passed in)
    source: str
    reason: str
    min_agreement: float
    agreement: dict[str, float] = field(default_factory=dict)
    pairs: int = 0

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


Loader = Callable[[str, str], "Scorer"]  # (provider name, precision) -> a loaded scorer


def decisions(scorer: Scorer, pairs: list[validation_sample.ValidationPair]) -> np.ndarray:
    """For each pair, whether the scorer ranks chosen above rejected for that pair's user (bool, (n,))."""
    n = len(pairs)
    seen = scorer.seen_users()
    prior = scorer.prior
    weights = np.stack([seen.get(p.user_id, prior) for p in pairs])
    prompts = [p.prompt for p in pairs]
    enc = scorer.encode(prompts * 2, [p.chosen for p in pairs] + [p.rejected for p in pairs])
    rewards = scorer.rewards(enc, np.concatenate([weights, weights]))
    return rewards[:n] > rewards[n:]


def candidates(scorer: Scorer) -> list[str]:
    """The precisions faster than fp32 that the scorer's provider can run on this bundle here, fastest first."""
    backend = scorer.backend
    return [
        p
        for p in backend.fast_first
        if p != REFERENCE and backend.unavailable(p) is None and backend.graph(p) in scorer.meta.graphs
    ]


def choose(
    directory: str | Path,
    provider: str,
    load: Loader,
    requested: str = AUTO,
    min_agreement: float = DEFAULT_MIN_AGREEMENT,
    cache_dir: str | Path | None = None,
) -> tuple[Scorer, PrecisionChoice]:
    """The scorer to serve and why. `requested` other than auto is served as asked (the measurement, if cached, is
    still reported); under auto the fp32 scorer is loaded first (it is the reference, and under provider=auto it
    names the provider), then each faster precision is measured (or read from the cache) in speed order."""
    if not 0.0 <= min_agreement <= 1.0:
        raise ValueError(f"min_agreement must be within [0, 1], got {min_agreement}")
    if requested != AUTO:
        scorer = load(provider, requested)
        cached = _read_cache(cache_dir, _cache_key(scorer))
        reason = f"PAL_PRECISION={requested} overrides the choice by measured fidelity"
        return scorer, PrecisionChoice(requested, "override", reason, min_agreement, cached or {})
    reference = load(provider, REFERENCE)
    faster = candidates(reference)
    if not faster:
        label = reference.backend.label
        reason = f"the {label} provider runs nothing faster than fp32 here (or the bundle lacks its graph)"
        return reference, PrecisionChoice(REFERENCE, "only", reason, min_agreement, {REFERENCE: 1.0})
    try:
        pairs = validation_sample.read(directory)
    except validation_sample.ValidationSampleError as e:
        raise BundleError(str(e)) from e
    if not pairs:
        reason = (
            f"the bundle has no validation sample ({validation_sample.FILE}; re-export it from a checkpoint trained "
            f"by this pal-rm, or with `pal export --validation`), so it serves the default fp32 without measuring "
            f"{', '.join(faster)}"
        )
        return reference, PrecisionChoice(REFERENCE, "no-sample", reason, min_agreement)
    key = _cache_key(reference)
    agreement = _read_cache(cache_dir, key) or {}
    source = "cached" if all(p in agreement for p in faster) else "measured"
    served: Scorer | None = None
    if source == "measured":
        expected = decisions(reference, pairs)
        for precision in faster:
            try:
                scorer = load(reference.backend.name, precision)
            except ProviderError as e:  # a precision that does not start here is not a reason to not start at all
                log.warning("%s not measured: %s", precision, e)
                continue
            agreement[precision] = float(np.mean(decisions(scorer, pairs) == expected))
            log.info("%s keeps %.4f of %d validation decisions", precision, agreement[precision], len(pairs))
            if served is None and agreement[precision] >= min_agreement:
                served = scorer  # the fastest that passes; slower ones are measured for /info, then dropped
        agreement[REFERENCE] = 1.0
        _write_cache(cache_dir, key, agreement, len(pairs))
    chosen = next((p for p in faster if agreement.get(p, -1.0) >= min_agreement), REFERENCE)
    if chosen == REFERENCE:
        served = reference
        best = max(faster, key=lambda p: agreement.get(p, -1.0))
        kept = f"{best} keeps {agreement[best]:.2%}" if best in agreement else f"{best} did not start"
        reason = f"no faster precision keeps >= {min_agreement:.2%} of {len(pairs)} validation decisions ({kept}): "
        reason += "serving fp32"
    else:
        served = served if served is not None and served.precision == chosen else load(reference.backend.name, chosen)
        reason = f"{chosen} is the fastest precision keeping >= {min_agreement:.2%} of {len(pairs)} validation "
        reason += "decisions"
    agreement.setdefault(REFERENCE, 1.0)
    return served, PrecisionChoice(chosen, source, reason, min_agreement, agreement, len(pairs))


def _hardware() -> str:
    """What the same bundle's bf16 or fp16 arithmetic depends on: the CPU model (kernels differ between AMX and
    AVX512-BF16) and the provider's device."""
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return name


def _cache_key(scorer: Scorer) -> str:
    hardware = hashlib.sha256(_hardware().encode()).hexdigest()[:8]
    return f"{scorer.meta.version}-{scorer.backend.name}-{hardware}"


def _read_cache(cache_dir: str | Path | None, key: str) -> dict[str, float] | None:
    if cache_dir is None:
        return None
    path = Path(cache_dir) / f"{key}.json"
    try:
        agreement = json.loads(path.read_text())["agreement"]
        return {str(k): float(v) for k, v in agreement.items()}
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        log.warning("ignoring the unreadable precision measurement %s: %s", path, e)
        return None


def _write_cache(cache_dir: str | Path | None, key: str, agreement: dict[str, float], pairs: int) -> None:
    if cache_dir is None:
        return
    path = Path(cache_dir) / f"{key}.json"
    record = {"agreement": agreement, "pairs": pairs, "hardware": _hardware(), "measured_at": _now()}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=2))
        tmp.replace(path)
    except OSError as e:  # a read-only disk costs a measurement per start, not the start itself
        log.warning("could not cache the precision measurement in %s: %s", path, e)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
