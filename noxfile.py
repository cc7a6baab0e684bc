"""Development sessions for the dilated-attention-pytorch monorepo.

    nox -s demo          set up and run the main job (CPU, or every GPU present)
    nox -s tests         each package's CPU tests, each in a venv with only its declared deps
    nox -s integration   multi-process tests (gloo on CPU; NCCL under torchrun on GPUs)
    nox -s hf            the Hugging Face transformers integration (umbrella [hf] extra) on tiny models
    nox -s lint typecheck build
    nox -s bench         GPU benchmarks (off by default)

On a GPU machine with torch preinstalled: `nox --no-venv -s integration` uses that torch and
puts every packages/*/src on PYTHONPATH instead of installing.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import nox

ROOT = Path(__file__).parent
PACKAGES_DIR = ROOT / "packages"
nox.options.default_venv_backend = "uv|virtualenv"
nox.options.sessions = ["tests", "integration", "lint", "typecheck"]
nox.options.error_on_missing_interpreters = True

TORCH_VERSION = "2.13.0"
LOCAL_TORCH_WHEELS = Path("/opt/wheels")
TEST_TOOLS = ["pytest>=8", "hypothesis>=6.100", "numpy>=1.24"]
# NVLink multicast stays off on multi-GPU hosts: NCCL's NVLS and torch's symmetric-memory
# multicast paths fail or hang on some driver/fabric setups, and ring attention does not need them.
NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}

# package dir -> (sibling package dirs it declares, extras its tests need, per package dir)
PACKAGES: dict[str, tuple[list[str], dict[str, str]]] = {
    "attn-core": ([], {"attn-core": "[triton]"}),
    "attn-sparse": (["attn-core"], {"attn-sparse": "[triton]"}),
    # attn-sparse[triton]: ring block-sparse through attn_sparse's Triton kernels (interpreter on CPU)
    "attn-ring": (["attn-core", "attn-sparse"], {"attn-ring": "[sparse]", "attn-sparse": "[triton]"}),
    "memory-runtime": ([], {"memory-runtime": "[plot,native]"}),
    "dilated-attention-pytorch": (
        ["attn-core", "attn-sparse", "attn-ring", "memory-runtime"],
        {"dilated-attention-pytorch": "[all]"},
    ),
}
SRC_DIRS = [str(p / "src") for p in sorted(PACKAGES_DIR.iterdir()) if (p / "src").is_dir()]


def _uses_venv(session: nox.Session) -> bool:
    return session.venv_backend not in ("none", None) and not isinstance(
        session.virtualenv, nox.virtualenv.PassthroughEnv
    )


def _torch_spec() -> str:
    # A loose `torch` pulls the multi-GB CUDA build; the CPU wheel is pinned explicitly.
    local = sorted(LOCAL_TORCH_WHEELS.glob(f"torch-{TORCH_VERSION}+cpu-*.whl")) if LOCAL_TORCH_WHEELS.is_dir() else []
    return f"torch=={TORCH_VERSION}+cpu" if local else f"torch=={TORCH_VERSION}"


def _install_torch(session: nox.Session) -> None:
    if not _uses_venv(session):
        return
    if LOCAL_TORCH_WHEELS.is_dir():
        session.env["UV_FIND_LINKS"] = str(LOCAL_TORCH_WHEELS)
        session.env["PIP_FIND_LINKS"] = str(LOCAL_TORCH_WHEELS)
    session.install(_torch_spec())


def _pkg_paths(names: list[str], extras: dict[str, str] | None = None) -> list[str]:
    extras = extras or {}
    return [f"{PACKAGES_DIR / n}{extras.get(n, '')}" for n in names]


def _install_packages(session: nox.Session, names: list[str], extras: dict[str, str] | None = None) -> None:
    """Install local packages (non-editable, so packaging mistakes show) in one resolver call."""
    if _uses_venv(session):
        session.install(*_pkg_paths(names, extras), *TEST_TOOLS)
    else:
        session.env["PYTHONPATH"] = os.pathsep.join([*SRC_DIRS, session.env.get("PYTHONPATH", "")])


def _pytest(session: nox.Session, *args: str) -> None:
    # pytest exits 5 when it collects nothing: that is a failure here, not a pass.
    session.run("python", "-m", "pytest", *args, *session.posargs)


@nox.session
@nox.parametrize("package", list(PACKAGES))
def tests(session: nox.Session, package: str) -> None:
    """One package's CPU tests, installed with only its own declared dependencies."""
    siblings, extras = PACKAGES[package]
    _install_torch(session)
    _install_packages(session, [*siblings, package], extras)
    session.env.setdefault("TRITON_INTERPRET", "1")
    if package == "memory-runtime":
        # CI has a compiler and ninja: the pools' native hot path must build, and is tested beside the Python path
        session.env.setdefault("MEMORY_RUNTIME_REQUIRE_NATIVE", "1")
    _pytest(session, str(PACKAGES_DIR / package / "tests"), "-q", "-p", "no:cacheprovider")


@nox.session
def integration(session: nox.Session) -> None:
    """Cross-package and multi-process tests: gloo on CPU; NCCL under torchrun when GPUs exist."""
    _install_torch(session)
    _install_packages(session, list(PACKAGES), {"attn-core": "[triton]", "attn-ring": "[sparse]"})
    _pytest(session, str(ROOT / "integration_tests"), "-q", "-p", "no:cacheprovider")
    n_gpus = int(
        session.run("python", "-c", "import torch; print(torch.cuda.device_count())", silent=True, external=True)
        .strip()
        .splitlines()[-1]
    )
    if n_gpus >= 1:
        session.run(
            "torchrun",
            "--standalone",
            f"--nproc-per-node={n_gpus}",
            str(ROOT / "integration_tests" / "run_nccl.py"),
            env=NCCL_ENV,
            external=True,
        )
    else:
        session.log("no CUDA GPU: NCCL/torchrun part skipped (gloo part ran above)")


@nox.session
def lint(session: nox.Session) -> None:
    if _uses_venv(session):
        session.install("ruff>=0.6")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    _install_torch(session)
    if _uses_venv(session):
        session.install("mypy>=1.10", "types-psutil", *_pkg_paths(list(PACKAGES)), "numpy>=1.24")
    session.run("mypy", *[str(PACKAGES_DIR / n / "src") for n in PACKAGES])


@nox.session
def demo(session: nox.Session) -> None:
    """The main job: every capability against the float64 reference; table + report in demo-output/."""
    _install_torch(session)
    _install_packages(
        session, list(PACKAGES), {"attn-core": "[triton]", "attn-ring": "[sparse]", "memory-runtime": "[plot,native]"}
    )
    if _uses_venv(session):
        session.install("matplotlib>=3.7")
    session.run("python", str(ROOT / "tools" / "demo.py"), "--out", str(ROOT / "demo-output"), *session.posargs)


@nox.session(default=False, venv_backend="none")
def bench(session: nox.Session) -> None:
    """GPU benchmarks (tools/bench_*.py) with the machine's own CUDA torch, packages from source.

    Off by default; refuses to run without CUDA. Results go to bench-output/<script>/ (copy what
    you keep into docs/benchmarks/); the ring benchmarks run under torchrun on every GPU.
    """
    _install_packages(session, list(PACKAGES))
    n_gpus = int(
        session.run("python", "-c", "import torch; print(torch.cuda.device_count())", silent=True, external=True)
        .strip()
        .splitlines()[-1]
    )
    if n_gpus == 0:
        session.error("nox -s bench needs a CUDA GPU; none is visible")
    for script in sorted((ROOT / "tools").glob("bench_*.py")):
        out = ["--out", str(ROOT / "bench-output" / script.stem)]
        if script.stem.startswith("bench_ring"):
            launcher = ["torchrun", "--standalone", f"--nproc-per-node={n_gpus}"]
            session.run(*launcher, str(script), *out, *session.posargs, env=NCCL_ENV, external=True)
        else:
            session.run("python", str(script), *out, *session.posargs, external=True)


def _fresh_env(session: nox.Session, path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    if shutil.which("uv"):
        session.run("uv", "venv", "-q", "--python", sys.executable, str(path), external=True)
    else:
        session.run(sys.executable, "-m", "venv", str(path), external=True)
    return path / "bin" / "python"


def _pip_into(session: nox.Session, python: Path, *args: str) -> None:
    links = []
    if LOCAL_TORCH_WHEELS.is_dir():
        links += ["--find-links", str(LOCAL_TORCH_WHEELS)]
    if shutil.which("uv"):
        session.run("uv", "pip", "install", "-q", "--python", str(python), *links, *args, external=True)
    else:
        session.run(str(python), "-m", "pip", "install", "-q", *links, *args, external=True)


# (wheels to install, module that must import, modules that must NOT be importable, smoke script
# and its arguments).
# Each set is a package's wheel plus the sibling wheels it declares, without extras: what a plain
# `pip install <package>` gives. The smoke script then exercises the package, not just its import.
BUILD_CHECKS: list[tuple[list[str], str, list[str], list[str]]] = [
    (["attn-core"], "attn_core", ["attn_sparse", "attn_ring", "memory_runtime"], ["smoke_attn_core.py"]),
    (["attn-core", "attn-sparse"], "attn_sparse", ["attn_ring", "memory_runtime"], ["smoke_attn_sparse.py"]),
    (["attn-core", "attn-ring"], "attn_ring", ["attn_sparse", "memory_runtime"], ["smoke_attn_ring.py"]),
    (["memory-runtime"], "memory_runtime", ["attn_core", "attn_sparse", "attn_ring"], ["smoke_memory_runtime.py"]),
    (
        ["attn-core", "dilated-attention-pytorch"],
        "dilated_attention_pytorch",
        ["attn_sparse", "attn_ring", "memory_runtime"],
        ["smoke_dilated_attention_pytorch.py"],
    ),
    (
        list(PACKAGES),
        "dilated_attention_pytorch",
        [],
        ["smoke_dilated_attention_pytorch.py", "attn_sparse", "attn_ring", "memory_runtime"],
    ),
]


@nox.session
def build(session: nox.Session) -> None:
    """Wheel + sdist for all five packages; each wheel installed into a clean venv and smoke-tested.

    Every venv gets the CPU torch and the wheels of one package and its declared siblings, so a
    dependency a package forgot to declare fails here (tools/smoke/ has one script per package).
    """
    session.install("build>=1.2", "hatchling>=1.21")
    dist = ROOT / "dist"
    if dist.exists():
        shutil.rmtree(dist)
    for name in PACKAGES:
        session.run("python", "-m", "build", "--outdir", str(dist), str(PACKAGES_DIR / name))
    artifacts = sorted(p.name for p in dist.iterdir())
    wheels = [a for a in artifacts if a.endswith(".whl")]
    sdists = [a for a in artifacts if a.endswith(".tar.gz")]
    if len(wheels) != len(PACKAGES) or len(sdists) != len(PACKAGES):
        session.error(f"expected {len(PACKAGES)} wheels and sdists, got {artifacts}")
    envs = ROOT / ".nox" / "build-envs"
    for names, module, absent, smoke in BUILD_CHECKS:
        python = _fresh_env(session, envs / "-".join(names if len(names) < len(PACKAGES) else ["all"]))
        # Sibling wheels by file path, so no same-named distribution from an index can stand in.
        files = [str(dist / w) for n in names for w in wheels if w.startswith(n.replace("-", "_") + "-")]
        _pip_into(session, python, _torch_spec(), *files)
        code = (
            f"import importlib.util, {module}; "
            f"bad = [m for m in {absent!r} if importlib.util.find_spec(m)]; "
            f"assert not bad, f'unexpectedly importable: {{bad}}'; "
            f"print('{module}', {module}.__version__, 'imports cleanly')"
        )
        session.run(str(python), "-c", code, external=True)
        # PYTHONPATH cleared: no source tree may stand in for the installed wheel
        script, *script_args = smoke
        session.run(
            str(python), str(ROOT / "tools" / "smoke" / script), *script_args, external=True, env={"PYTHONPATH": ""}
        )
    session.log(f"built, installed and smoke-tested: {artifacts}")


@nox.session
def hf(session: nox.Session) -> None:
    """dilated_attention_pytorch.hf against transformers: tiny random Llama/Mistral/Qwen2 models, CPU, no downloads."""
    siblings, _ = PACKAGES["dilated-attention-pytorch"]
    _install_torch(session)
    _install_packages(session, [*siblings, "dilated-attention-pytorch"], {"dilated-attention-pytorch": "[all,hf]"})
    # offline: the tests build models from configs; nothing may reach the Hugging Face Hub
    session.env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    _pytest(session, str(PACKAGES_DIR / "dilated-attention-pytorch" / "tests_hf"), "-q", "-p", "no:cacheprovider")
