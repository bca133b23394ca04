"""Export a trained model for use without speedup: ``model.safetensors`` plus its config.

The weights are the network's own ``state_dict`` (the ``net.`` prefix of speedup's wrapper
removed), so ``torchvision.models.resnet50(num_classes=...).load_state_dict(load_file(path))``
or, for Hugging Face models, ``AutoModelForCausalLM.from_pretrained(folder)`` reads them.
Pruned models export dense tensors with the pruned weights at zero (masks are applied to the
weights in place during training). Tensors that share storage (tied embeddings) are written
as separate copies, since safetensors stores no aliasing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from speedup.checkpoint import read_checkpoint, resolve_checkpoint
from speedup.errors import CheckpointError

__all__ = ["export_model", "network_weights"]

WEIGHTS = "model.safetensors"


def network_weights(model_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The wrapped network's weights: ``net.x`` -> ``x`` when every key has the prefix."""
    if model_state and all(k.startswith("net.") for k in model_state):
        return {k[len("net.") :]: v for k, v in model_state.items()}
    return dict(model_state)


def _ema_weights(parts: dict[str, Any]) -> dict[str, torch.Tensor] | None:
    for key, saved in parts["algorithms"]["algorithms"].items():
        if key.partition("#")[0] == "ema" and saved.get("weights") is not None:
            if saved.get("model_holds_ema"):  # the model already holds the average
                return dict(parts["model"])
            return dict(saved["weights"])
    return None


def _separate(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors, each with its own storage."""
    seen: set[int] = set()
    out = {}
    for name, tensor in tensors.items():
        tensor = tensor.detach().cpu().contiguous()
        pointer = tensor.untyped_storage().data_ptr()
        if pointer in seen and tensor.numel():
            tensor = tensor.clone()
        seen.add(tensor.untyped_storage().data_ptr())
        out[name] = tensor
    return out


def export_model(source: str | Path, out: str | Path | None = None, ema: bool = False) -> Path:
    """Write ``model.safetensors`` (+ ``config.json`` for Hugging Face models, and the run's
    ``speedup_config.json``) from a run directory or checkpoint; returns the weights' path.

    ``source`` is a run directory (its newest complete checkpoint; after a finished run that
    is the final state, with EMA weights if EMA evaluated with them), a checkpoints folder or
    one checkpoint. ``out`` defaults to the run directory. ``ema`` exports the EMA average of
    a checkpoint taken during training."""
    from safetensors.torch import save_file

    checkpoint = resolve_checkpoint(source)
    meta, parts = read_checkpoint(checkpoint)
    weights = parts["model"]
    if ema:
        weights = _ema_weights(parts)
        if weights is None:
            raise CheckpointError(f"{checkpoint}: --ema: this run has no EMA weights")
    weights = _plain_network_weights(weights, meta, parts["algorithms"]["algorithms"])
    tensors = _separate(network_weights(weights))
    out = Path(out) if out is not None else _run_dir_of(checkpoint)
    out.mkdir(parents=True, exist_ok=True)
    metadata = {
        "format": "pt",  # what Hugging Face loaders expect
        "speedup_checkpoint": str(checkpoint),
        "step": str(meta["timestamp"]["batch"]),
    }
    path = out / WEIGHTS
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    # safetensors creates its file with mode 0600 whatever the umask; give it the mode every
    # other file gets (0644 under the usual umask 022), so whoever may read the folder can load it.
    os.chmod(tmp, 0o666 & ~_umask())
    tmp.replace(path)
    if meta.get("model_config") is not None:  # a Hugging Face config: from_pretrained(out)
        (out / "config.json").write_text(json.dumps(meta["model_config"], indent=2) + "\n")
    if meta.get("config") is not None:
        (out / "speedup_config.json").write_text(json.dumps(meta["config"], indent=2) + "\n")
    return path


def _plain_network_weights(
    weights: dict[str, Any], meta: dict[str, Any], saved_states: dict[str, Any]
) -> dict[str, Any]:
    """Let each algorithm of the run turn its reparametrised weights into plain ones
    (``Algorithm.exported_weights``), looked up by name in the registry like any plugin."""
    from speedup.algorithm import ALGORITHMS, build_algorithm

    arguments = (meta.get("config") or {}).get("algorithms") or {}
    for name in meta.get("algorithms", []):
        if name not in ALGORITHMS:
            continue
        try:
            algorithm = build_algorithm(name, arguments.get(name))
        except (TypeError, ValueError):  # saved by another version: use the defaults
            algorithm = build_algorithm(name)
        saved = saved_states.get(f"{name}#0")
        if saved:
            algorithm.load_state_dict(saved)
        weights = algorithm.exported_weights(weights)
    return weights


def _umask() -> int:
    """The process's file-creation mask. Read from /proc where it is shown, so that no other
    thread ever sees it changed; elsewhere set and restored at once."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _run_dir_of(checkpoint: Path) -> Path:
    if checkpoint.parent.name == "checkpoints":
        return checkpoint.parent.parent
    return checkpoint.parent
