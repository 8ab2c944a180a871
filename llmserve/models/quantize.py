"""Quantized model versions: ``llmserve quantize`` turns a prepared version into an INT8 one.

The scheme is compressed-tensors' ``W8A8`` preset, the format llmcompressor writes and
vLLM loads (its CPU build runs it through oneDNN's int8 GEMM):

- weights: int8, symmetric, one scale per output channel, ``scale = max|w| / 127``,
  rounded to nearest (llmcompressor's ``QuantizationModifier`` without SmoothQuant or GPTQ);
- activations: int8, symmetric, one scale per token, computed by the engine at run time
  (nothing to calibrate, so no calibration data is needed);
- embeddings, the LM head and the norms stay as they were: the LM head of the bundled
  model shares the embedding matrix, and both are the quantization-sensitive ends.

The result is an ordinary version folder (config with its ``quantization_config``,
safetensors, tokenizer, ``manifest.json`` whose ``extra.quantization`` names the scheme and
the source version's checksums), written into a temporary sibling and renamed into place,
so it deploys, canaries and rolls back like any other version.
"""

from __future__ import annotations

import json
import logging
import shutil
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from llmserve.errors import PrepareError
from llmserve.models.repository import (
    _TMP_PREFIX,
    MANIFEST_NAME,
    Manifest,
    ModelRepository,
    PrepareResult,
    move_into_place,
    sha256_source,
    weights_checksums,
)

logger = logging.getLogger(__name__)

SCHEMES = ("w8a8",)
INT8_MAX = 127
# Kept in their source dtype: the ends of the network (see the module docstring).
_KEEP_SUFFIXES = ("embed_tokens.weight", "lm_head.weight")
_INDEX_NAME = "model.safetensors.index.json"


@dataclass(frozen=True)
class QuantizedTensor:
    weight: Any  # torch.int8, [out, in]
    scale: Any  # torch.float32, [out, 1]


def quantize_per_channel(weight: Any) -> QuantizedTensor:
    """Symmetric int8 with one scale per output channel (row), round to nearest.

    An all-zero row gets scale 1 (any scale represents it exactly), so nothing divides by zero.
    """
    import torch

    w = weight.to(torch.float32)
    amax = w.abs().amax(dim=1, keepdim=True)
    scale = torch.where(amax > 0, amax / INT8_MAX, torch.ones_like(amax))
    q = torch.round(w / scale).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return QuantizedTensor(q, scale)


def dequantize(tensor: QuantizedTensor) -> Any:
    import torch

    return tensor.weight.to(torch.float32) * tensor.scale


def is_quantized_weight(name: str, shape: tuple[int, ...]) -> bool:
    """Linear weights of the decoder layers: 2-D, inside ``layers.N``, not the embeddings or the head."""
    return len(shape) == 2 and name.endswith(".weight") and ".layers." in name and not name.endswith(_KEEP_SUFFIXES)


def quantization_config() -> dict[str, Any]:
    """The ``quantization_config`` of config.json: compressed-tensors' W8A8 preset, compressed."""
    return {
        "quant_method": "compressed-tensors",
        "format": "int-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel",
                            "dynamic": False, "group_size": None, "observer": "minmax"},
                "input_activations": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token",
                                      "dynamic": True, "group_size": None, "observer": None},
                "output_activations": None,
            }
        },
        "ignore": ["lm_head"],
        "kv_cache_scheme": None,
    }


def check_request(repository: ModelRepository, name: str, source_version: str, target_version: str,
                  scheme: str, force: bool) -> Manifest:
    """Every reason not to start, as one PrepareError, before any work; returns the source's manifest."""
    if scheme not in SCHEMES:
        raise PrepareError(scheme, f"unknown quantization scheme; choose from {', '.join(SCHEMES)}")
    model_dir = repository.root / name
    if not model_dir.is_dir():
        raise PrepareError(model_dir, f"no model {name!r} in the repository; prepare it first (llmserve prepare)")
    source = repository.version_dir(name, source_version)
    if not source.is_dir():
        known = ", ".join(repository.list_versions(name)) or "none"
        raise PrepareError(source, f"no version {source_version!r} of {name} (prepared versions: {known})")
    if source_version == target_version:
        raise PrepareError(source, "the quantized version needs a label of its own (--version)")
    manifest = repository.verify(name, source_version)  # no manifest, or damaged weights: refused here
    config = _read_config(source)
    if "quantization_config" in config:
        raise PrepareError(source / "config.json", "this version is already quantized; quantize its source instead")
    target = repository.version_dir(name, target_version)
    if target.exists() and not force:
        raise PrepareError(target, "already exists; choose another --version or pass --force to replace it")
    return manifest


def quantize_version(repository: ModelRepository, name: str, source_version: str, target_version: str,
                     scheme: str = "w8a8", force: bool = False) -> PrepareResult:
    """Write ``<name>/<target_version>``: the INT8 W8A8 version of ``<name>/<source_version>``."""
    source_manifest = check_request(repository, name, source_version, target_version, scheme, force)
    source = repository.version_dir(name, source_version)
    target = repository.version_dir(name, target_version)
    tmp = target.parent / f"{_TMP_PREFIX}{target_version}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        stats = _write_quantized(source, tmp)
        manifest = Manifest(
            name=name,
            version=target_version,
            source=str(source),
            source_sha256=sha256_source(source),
            weights_sha256=weights_checksums(tmp),
            dtype="int8",
            parameter_count=source_manifest.parameter_count,
            created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            format=source_manifest.format,
            architecture=source_manifest.architecture,
            max_position_embeddings=source_manifest.max_position_embeddings,
            extra={"quantization": {
                "scheme": "W8A8", "format": "compressed-tensors int-quantized",
                "weights": "int8 symmetric, per output channel, round to nearest",
                "activations": "int8 symmetric, dynamic per token",
                "source_version": source_version, "source_dtype": source_manifest.dtype,
                "source_weights_sha256": source_manifest.weights_sha256, **stats,
            }},
        )
        (tmp / MANIFEST_NAME).write_text(manifest.to_json())
        move_into_place(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("quantized %s/%s into %s (%s tensors int8)", name, source_version, target_version,
                stats["quantized_tensors"])
    return PrepareResult(target, manifest, created=True)


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise PrepareError(path, "missing; a prepared version is a Hugging Face folder with config.json") from None
    except ValueError as exc:
        raise PrepareError(path, f"not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise PrepareError(path, "expected a JSON object")
    return data


def _write_quantized(source: Path, dest: Path) -> dict[str, Any]:
    """Copy the folder, quantizing the linear weights of each safetensors file; returns counts and errors."""
    from safetensors.torch import load_file, save_file

    for path in source.iterdir():
        if path.name.startswith(".") or path.name == MANIFEST_NAME or path.suffix == ".safetensors":
            continue
        if path.is_dir():
            shutil.copytree(path, dest / path.name)
        elif path.name not in ("config.json", _INDEX_NAME):
            shutil.copy2(path, dest / path.name)
    quantized = kept = 0
    worst = 0.0  # the largest |w - dequantized| over the step of its row: at most 0.5 for round to nearest
    weight_map: dict[str, str] = {}
    for path in sorted(source.glob("*.safetensors")):
        tensors = load_file(str(path))
        out: dict[str, Any] = {}
        for key, tensor in tensors.items():
            if not is_quantized_weight(key, tuple(tensor.shape)):
                out[key] = tensor
                kept += 1
                continue
            q = quantize_per_channel(tensor)
            error = (dequantize(q) - tensor.float()).abs() / q.scale
            worst = max(worst, float(error.max()))
            out[key] = q.weight
            out[key.removesuffix(".weight") + ".weight_scale"] = q.scale
            quantized += 1
        save_file(out, str(dest / path.name), metadata={"format": "pt"})
        weight_map.update({key: path.name for key in out})
    if not quantized:
        raise PrepareError(source, "no decoder-layer linear weights found to quantize (expected model.layers.N.*)")
    config = _read_config(source)
    config["quantization_config"] = quantization_config()
    (dest / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if (source / _INDEX_NAME).is_file():  # a sharded folder: the index must name the new scale tensors too
        index = json.loads((source / _INDEX_NAME).read_text())
        index["weight_map"] = weight_map
        (dest / _INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return {"quantized_tensors": quantized, "kept_tensors": kept, "max_error_in_steps": round(worst, 4)}
