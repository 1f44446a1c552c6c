"""A cached NeFT reference in compact form: only the weight matrices its cosine scores were made from.

The reference run exports a whole model (Gemma-3-270M: 1.1 GB, 61% of it the embedding; Llama-2-7B: 13 GB),
but the cosine scorer reads only the matrices of the scored kinds (`selection.modules`, part of the cache key:
up and down by default), one at a time (`scoring.WeightSource`). Once the scores are written,
`chain.scores` replaces the export folder by

    <reference run>/export/reference_weights.safetensors   those matrices, bit for bit, in their stored dtype
    <reference run>/export/reference_weights.json          what it holds (kinds, model type, sizes), for people

(`selection.reference.keep=scored`, the default): Gemma-3-270M's up and down matrices are 189 MB. The
safetensors header's metadata is what readers trust (format, model_type, kinds). No config.json is left, so
nothing mistakes the folder for a model: `stage=analyze`/`stage=eval` of the reference run are refused with
the way back (`keep=full`), and a config that needs more than the file holds runs the reference again.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

from neft_lab.errors import ConfigError
from neft_lab.io import atomic_dir, atomic_write_json, size_of

FILE = "reference_weights.safetensors"
INFO = "reference_weights.json"
FORMAT = "neft_lab.compact_reference/1"
KEEP = ("scored", "full", "none")  # selection.reference.keep; true = full, false = none


def keep_setting(value: Any) -> str:
    """`selection.reference.keep` as one of KEEP (true/false, the earlier booleans, read as full/none)."""
    if isinstance(value, bool):
        return "full" if value else "none"
    if value is None or str(value) not in KEEP:
        raise ConfigError(
            f"selection.reference.keep={value!r}: scored (the matrices the scores were made from, the default) | "
            "full (the whole reference model, e.g. for stage=analyze of it) | none (nothing once scored)"
        )
    return str(value)


def is_compact(folder: Path) -> bool:
    return (Path(folder) / FILE).is_file()


def read_header(path: Path) -> dict[str, Any]:
    """A safetensors file's header (tensor name → dtype, shape, data_offsets; `__metadata__`), read without torch."""
    try:
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > 100 * 2**20:
                raise ValueError(f"a header of {length} bytes")
            header = json.loads(handle.read(length))
    except (OSError, ValueError, struct.error) as err:
        raise ConfigError(f"{path} is not a readable safetensors file ({err})") from None
    if not isinstance(header, dict):
        raise ConfigError(f"{path} is not a readable safetensors file (its header is not a table)")
    return header


def compact_metadata(folder: Path) -> dict[str, Any] | None:
    """What a compact reference folder holds: {"model_type", "kinds", "tensors"}; None when it is damaged."""
    try:
        header = read_header(Path(folder) / FILE)
        meta = header.get("__metadata__") or {}
        if meta.get("format") != FORMAT:
            return None
        kinds = json.loads(meta["kinds"])
    except (ConfigError, KeyError, TypeError, ValueError):
        return None
    tensors = sorted(name for name in header if name != "__metadata__")
    return {"model_type": meta.get("model_type"), "kinds": [str(k) for k in kinds], "tensors": tensors}


def not_a_model(folder: Path) -> str:
    """The one-line refusal for loading a compact reference as a model (stage=analyze, stage=eval)."""
    meta = compact_metadata(folder) or {"kinds": ["?"]}
    return (
        f"{folder} is a NeFT reference run whose cache keeps only the {'/'.join(meta['kinds'])} weight matrices its "
        "scores were made from (selection.reference.keep=scored), not a whole model: to analyse or evaluate it, "
        "make it again with its model kept: rerun the NeFT command with selection.reference.keep=full (or "
        "stage=reference selection.reference.keep=full)"
    )


def _sources(export: Path) -> dict[str, Path]:
    """Tensor name → the safetensors file of a Hugging Face export that holds it."""
    index = export / "model.safetensors.index.json"
    if index.exists():
        return {name: export / file for name, file in json.loads(index.read_text())["weight_map"].items()}
    single = export / "model.safetensors"
    if not single.exists():
        raise ConfigError(f"{export} holds no safetensors weights (model.safetensors or an index)")
    return dict.fromkeys((n for n in read_header(single) if n != "__metadata__"), single)


def compact(export: Path, kinds: list[str], chunk: int = 64 * 2**20) -> dict[str, Any]:
    """Replace the exported model in `export` by the compact form holding the matrices of `kinds`; returns
    what reference_weights.json says. The tensors' bytes are copied as they are stored, a chunk at a time
    (a 7B model's up/down matrices never sit in memory), into a new folder that replaces `export` in one
    rename: a crash leaves the full export, or (between the two renames) none, and the reference runs again."""
    from neft_lab.neurons.geometry import NeuronSpace

    export = Path(export)
    config = json.loads((export / "config.json").read_text())
    model_type = config.get("model_type") or (config.get("text_config") or {}).get("model_type", "unknown")
    sources = _sources(export)
    headers = {file: read_header(file) for file in set(sources.values())}
    entries = {name: headers[file][name] for name, file in sources.items()}
    space = NeuronSpace.from_shapes(model_type, {n: e["shape"] for n, e in entries.items()}, kinds)
    names = [g.weight for g in space.groups]
    header: dict[str, Any] = {
        "__metadata__": {"format": FORMAT, "model_type": model_type, "kinds": json.dumps(list(kinds))}
    }
    offset = 0
    for name in names:
        start, end = entries[name]["data_offsets"]
        header[name] = {
            "dtype": entries[name]["dtype"],
            "shape": entries[name]["shape"],
            "data_offsets": [offset, offset + end - start],
        }
        offset += end - start
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    full_bytes = size_of(export)
    with atomic_dir(export) as tmp:
        with open(tmp / FILE, "wb") as out:
            out.write(struct.pack("<Q", len(encoded)) + encoded)
            for name in names:
                file = sources[name]
                start, end = entries[name]["data_offsets"]
                with open(file, "rb") as source:
                    (length,) = struct.unpack("<Q", source.read(8))
                    source.seek(8 + length + start)
                    left = end - start
                    while left:
                        block = source.read(min(chunk, left))
                        if not block:
                            raise ConfigError(f"{file} is truncated: {name} ends past the end of the file")
                        out.write(block)
                        left -= len(block)
            out.flush()
            os.fsync(out.fileno())
        held = compact_metadata(tmp)
        if held is None or held["tensors"] != sorted(names):
            raise ConfigError(
                f"the compact reference written from {export} does not read back: kept the export"
            )
        info = {
            "format": FORMAT,
            "what": "the weight matrices of a NeFT reference run that its cosine scores were made from; the rest of "
            "the exported model (embeddings, norms, other matrices, tokenizer) was dropped once scored "
            "(selection.reference.keep=scored; keep=full keeps the whole model)",
            "model_type": model_type,
            "kinds": list(kinds),
            "tensors": len(names),
            "parameters": sum(_numel(entries[n]["shape"]) for n in names),
            "bytes": (tmp / FILE).stat().st_size,
            "export_bytes": full_bytes,
        }
        atomic_write_json(tmp / INFO, info)
    return info


def _numel(shape: list[int]) -> int:
    count = 1
    for size in shape:
        count *= int(size)
    return count
