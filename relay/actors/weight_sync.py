"""Weight updates as files: the pure pieces of moving a learner's full HF-named state dict to vLLM generators.

A state dict travels as size-bounded safetensors buckets: files in a private transfer folder on /dev/shm (on
disk when /dev/shm is missing or too small: `relay.scratch`) or the same bytes in the Ray object store. This
module plans, writes and reads them, and checks an update against the model from the safetensors headers
alone; `relay.actors.weight_push` sends them (from the learner, never through the driver).

Nothing here imports Ray or vLLM, so it is unit-tested on its own and reused by the generator to validate an
update before it touches the engine: vLLM's in-place reload leaves the model unusable if it fails half way.
"""
from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from relay.scratch import private_dir, private_temp_file, scratch_root, write_private

if TYPE_CHECKING:
    import torch

DEFAULT_BUCKET_BYTES = 256 * 2**20
TRANSFER_STEM = "relay-weights-"  # + pid + "-": transfer folders' names
# Names a learner's state dict may carry that vLLM skips on load (HF keeps them as buffers or tied aliases).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")


class WeightUpdateError(RuntimeError):
    """An update does not fit the model (names, shapes), could not be read, or failed to load."""


@dataclass(frozen=True)
class TensorSpec:
    """Shape and safetensors dtype string (e.g. "F32", "BF16") of one tensor."""

    shape: tuple[int, ...]
    dtype: str


# ---------------------------------------------------------------------------------------------------------
# Buckets: pure functions.


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def plan_buckets(sizes: Sequence[tuple[str, int]], bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> list[list[str]]:
    """Split names (in the given order) into consecutive groups of at most `bucket_bytes` each.

    Order is kept because vLLM buffers a layer's weights until the whole layer has arrived; a tensor larger
    than a bucket gets a bucket of its own.
    """
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be > 0, got {bucket_bytes}")
    buckets: list[list[str]] = []
    current: list[str] = []
    used = 0
    for name, size in sizes:
        if current and used + size > bucket_bytes:
            buckets.append(current)
            current, used = [], 0
        current.append(name)
        used += size
    if current:
        buckets.append(current)
    return buckets


def _prepare(state_dict: Mapping[str, torch.Tensor], unshare: bool = True) -> dict[str, torch.Tensor]:
    """CPU, contiguous, detached tensors; with `unshare` tensors sharing a storage (tied weights, views into a
    flat ZeRO buffer) are cloned: safetensors' `save` refuses shared memory (our own writers do not care)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in state_dict.items():
        t = tensor.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if unshare and ptr in seen and t.numel() > 0:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[name] = t
    return out


# torch dtype name -> safetensors dtype string (the format's spec)
_SAFETENSORS_DTYPES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64", "int32": "I32",
    "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL", "float8_e4m3fn": "F8_E4M3",
    "float8_e5m2": "F8_E5M2",
}


def _bucket_header(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None) -> tuple[bytes, int]:
    """A safetensors file's first bytes (8-byte little-endian header length, JSON header padded with spaces to 8
    bytes; the data follows in the tensors' order) and the data's length."""
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, t in tensors.items():
        dtype = _SAFETENSORS_DTYPES.get(str(t.dtype).removeprefix("torch."))
        if dtype is None:
            raise WeightUpdateError(f"tensor {name!r}: dtype {t.dtype} has no safetensors code")
        header[name] = {"dtype": dtype, "shape": list(t.shape), "data_offsets": [offset, offset + _nbytes(t)]}
        offset += _nbytes(t)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    return struct.pack("<Q", len(head)) + head, offset


def _raw(t: torch.Tensor) -> Any:
    import torch

    return t.reshape(-1).view(torch.uint8).numpy()  # the tensor's own bytes, no copy


def pack_bucket(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> Any:
    """One safetensors file's bytes as a uint8 numpy array, each tensor copied once into its place.

    safetensors' own `save` copies every tensor twice (to Python bytes, then into the file image): 0.6 s for
    SmolLM2's 540 MB on a quiet machine, 2-3 s inside a busy PPO system. `tensors` must be CPU and contiguous
    (`_prepare`)."""
    import numpy as np

    head, size = _bucket_header(tensors, metadata)
    out = np.empty(len(head) + size, dtype=np.uint8)
    out[: len(head)] = np.frombuffer(head, dtype=np.uint8)
    at = len(head)
    for t in tensors.values():
        n = _nbytes(t)
        if n:
            out[at : at + n] = _raw(t)
        at += n
    return out


def write_bucket_file(tensors: Mapping[str, torch.Tensor], path: str | Path,
                      metadata: Mapping[str, str] | None = None, overwrite: bool = False) -> Path:
    """Write one safetensors file straight from the tensors' memory (the only copy is the kernel's into the
    file: 0.2 s for 540 MB to /dev/shm, where building the bytes first cost 0.3-1.6 s more, most of it page
    faults of a fresh buffer). A new private file, as `write_private`; with `overwrite`, a regular file already
    at `path` (in a folder only this user can write: `relay.scratch.reused_dir`) is rewritten in place, its
    pages reused, and cut to the new length. `tensors` must be CPU and contiguous."""
    head, size = _bucket_header(tensors, metadata)
    flags = os.O_WRONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags) if overwrite else None
    except FileNotFoundError:
        fd = None
    if fd is None:
        fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb", buffering=0) as f:
        f.write(head)
        for t in tensors.values():
            if _nbytes(t):
                view = memoryview(_raw(t))
                while view:  # a raw write may take only part
                    view = view[f.write(view):]
        f.truncate(len(head) + size)
    return Path(path)


def bucket_plan(state_dict: Mapping[str, torch.Tensor], bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                metadata: Mapping[str, str] | None = None,
                unshare: bool = True) -> Iterator[tuple[dict[str, torch.Tensor], dict[str, str]]]:
    """The state dict's buckets (CPU, contiguous tensors of at most `bucket_bytes` each) with their metadata
    (`metadata` + bucket number and count), one at a time; `unshare` as `_prepare`."""
    tensors = _prepare(state_dict, unshare)
    plan = plan_buckets([(n, _nbytes(t)) for n, t in tensors.items()], bucket_bytes)
    for i, names in enumerate(plan):
        yield {n: tensors[n] for n in names}, {**(metadata or {}), "bucket": str(i), "num_buckets": str(len(plan))}


def iter_serialized_buckets(
    state_dict: Mapping[str, torch.Tensor],
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    metadata: Mapping[str, str] | None = None,
) -> Iterator[Any]:
    """The state dict as safetensors blobs (`pack_bucket`: uint8 arrays, written and `ray.put` like bytes) of at
    most `bucket_bytes` of tensors each, one at a time (so a caller can hand each to the object store before
    the next is built)."""
    for bucket, meta in bucket_plan(state_dict, bucket_bytes, metadata):
        yield pack_bucket(bucket, metadata=meta)


def serialize_buckets(
    state_dict: Mapping[str, torch.Tensor],
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    metadata: Mapping[str, str] | None = None,
) -> list[Any]:
    """All blobs of `iter_serialized_buckets` in a list."""
    return list(iter_serialized_buckets(state_dict, bucket_bytes, metadata))


def write_buckets(
    state_dict: Mapping[str, torch.Tensor],
    out_dir: str | Path,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    prefix: str = "weights",
    metadata: Mapping[str, str] | None = None,
) -> list[Path]:
    """Write the state dict as safetensors buckets `<prefix>-00000-of-00003.safetensors` into `out_dir`."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (bucket, meta) in enumerate(bucket_plan(state_dict, bucket_bytes, metadata)):
        path = out_dir / f"{prefix}-{i:05d}-of-{int(meta['num_buckets']):05d}.safetensors"
        # save_file opens the path it is given: give it a mkstemp file, and rename (which replaces a link
        # planted at `path` instead of writing through it)
        tmp = private_temp_file(out_dir, path.name)
        save_file(bucket, str(tmp), metadata=meta)
        os.replace(tmp, path)
        paths.append(path)
    return paths


def write_blobs(blobs: Sequence[Any], out_dir: str | Path, prefix: str = "weights") -> list[Path]:
    """Write already-serialized safetensors buckets (from `serialize_buckets`: bytes-like) as files."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, blob in enumerate(blobs):
        path = out_dir / f"{prefix}-{i:05d}-of-{len(blobs):05d}.safetensors"
        paths.append(write_private(path, blob))  # never through a link planted at the path
    return paths


def iter_bucket_tensors(paths: Iterable[str | Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs from bucket files, in file order (memory-mapped, one tensor at a time)."""
    from safetensors import safe_open

    for path in paths:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def read_buckets(paths: Iterable[str | Path]) -> dict[str, torch.Tensor]:
    """All tensors of the given bucket files in one dict (names must be unique across buckets)."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in iter_bucket_tensors(paths):
        if name in out:
            raise WeightUpdateError(f"tensor {name!r} appears in more than one bucket")
        out[name] = tensor
    return out


# ---------------------------------------------------------------------------------------------------------
# Manifests: names, shapes and dtypes from safetensors headers, without reading tensor data.


def _header_from_bytes(head: bytes, what: str) -> dict[str, Any]:
    if len(head) < 8:
        raise WeightUpdateError(f"{what}: not a safetensors file (too short)")
    (n,) = struct.unpack("<Q", head[:8])
    if n > 100 * 2**20 or len(head) < 8 + n:
        raise WeightUpdateError(f"{what}: not a safetensors file (bad header length {n})")
    try:
        return json.loads(head[8 : 8 + n])
    except ValueError as err:
        raise WeightUpdateError(f"{what}: unreadable safetensors header") from err


def read_header(path: str | Path) -> dict[str, TensorSpec]:
    """Tensor specs from one safetensors file's header; raises WeightUpdateError when missing or malformed."""
    try:
        with open(path, "rb") as f:
            first = f.read(8)
            if len(first) < 8:
                raise WeightUpdateError(f"{path}: not a safetensors file (too short)")
            (n,) = struct.unpack("<Q", first)
            head = first + f.read(min(n, 100 * 2**20 + 1))
    except OSError as err:
        raise WeightUpdateError(f"cannot read weight file {path}: {err}") from err
    header = _header_from_bytes(head, str(path))
    return {
        name: TensorSpec(tuple(info["shape"]), info["dtype"])
        for name, info in header.items()
        if name != "__metadata__"
    }


def read_manifest(paths: Iterable[str | Path]) -> dict[str, TensorSpec]:
    """Union of the headers of several bucket files (duplicate names are an error)."""
    out: dict[str, TensorSpec] = {}
    for path in paths:
        for name, spec in read_header(path).items():
            if name in out:
                raise WeightUpdateError(f"tensor {name!r} appears in more than one bucket ({path})")
            out[name] = spec
    return out


def model_dir_manifest(model_dir: str | Path) -> dict[str, TensorSpec]:
    """Specs of a HF model folder's safetensors weights (single file or sharded with an index)."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        files = sorted({model_dir / f for f in json.loads(index.read_text())["weight_map"].values()})
    else:
        files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise WeightUpdateError(f"{model_dir}: no safetensors weights found")
    return read_manifest(files)


def check_update(
    update: Mapping[str, TensorSpec],
    model: Mapping[str, TensorSpec],
    allow_partial: bool = False,
    tied_embeddings: bool = False,
) -> None:
    """Raise WeightUpdateError unless `update` fits `model`: same shapes, no unknown names, and (unless
    `allow_partial`) every model tensor present. dtypes may differ: vLLM casts on load (bf16 -> fp32 etc.)."""
    problems: list[str] = []
    for name, spec in update.items():
        ref = model.get(name)
        if ref is None:
            if name.endswith(IGNORED_SUFFIXES) or (tied_embeddings and name == "lm_head.weight"):
                continue
            problems.append(f"unknown tensor {name!r}")
        elif tuple(spec.shape) != tuple(ref.shape):
            problems.append(f"{name}: shape {list(spec.shape)} != model {list(ref.shape)}")
    if not allow_partial:
        missing = [n for n in model if n not in update]
        if missing:
            problems.append(f"{len(missing)} tensor(s) missing, e.g. {missing[:3]}")
    if problems:
        shown = "; ".join(problems[:6]) + (f"; ... ({len(problems)} problems)" if len(problems) > 6 else "")
        raise WeightUpdateError(f"weight update does not fit the model: {shown}")


# ---------------------------------------------------------------------------------------------------------
# Where to put transfer files.


def transfer_dir(needed_bytes: int = 0, preferred: str | None = None) -> Path:
    """/dev/shm ($RELAY_SHM_DIR) when it exists and has room for `needed_bytes` (+10%), else the system temp
    dir (`relay.scratch.scratch_root`)."""
    return scratch_root(needed_bytes, preferred, what="weight transfer")


def new_transfer_folder(needed_bytes: int = 0) -> Path:
    """A fresh private folder (mode 0700, unpredictable name) for one transfer; the caller removes it."""
    return private_dir(f"{TRANSFER_STEM}{os.getpid()}-", needed_bytes, what="weight transfer")

