"""Weight transport from a learner (rank 0, holding a full HF-named state dict) to vLLM generators.

Two strategies, picked per generator by `push_weights(strategy="auto")`:

* ``shm`` (same node): the sender writes the state dict as size-bounded safetensors buckets to a private
  folder in /dev/shm (on disk when /dev/shm is missing or too small: `relay.scratch`), every generator loads
  the files in place through vLLM's `reload_weights` (see `vllm_worker_ext`), then the sender removes them. One write, N memory-mapped reads.
* ``object_store`` (any node): each bucket is serialized to safetensors bytes and `ray.put` once; Ray moves
  it to the generators' nodes, where each generator writes it to its local /dev/shm and loads it the same way.
  Bytes rather than numpy arrays because numpy has no bfloat16.

The pure helpers (bucket planning, writing, reading, header manifests and their checks) import no Ray and no
vLLM, so they are unit-tested on their own and reused by the generator to validate an update before it
touches the engine: vLLM's in-place reload leaves the model unusable if it fails half way.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import struct
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from relay.scratch import private_dir, private_temp_file, scratch_root, write_private

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

DEFAULT_BUCKET_BYTES = 256 * 2**20
DEFAULT_PUSH_TIMEOUT_S = 600.0
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


def _prepare(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous, detached tensors; aliases (tied weights) are cloned: safetensors refuses shared memory."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in state_dict.items():
        t = tensor.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen and t.numel() > 0:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[name] = t
    return out


def iter_serialized_buckets(
    state_dict: Mapping[str, torch.Tensor],
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    metadata: Mapping[str, str] | None = None,
) -> Iterator[bytes]:
    """The state dict as safetensors blobs of at most `bucket_bytes` of tensors each, one at a time (so a
    caller can hand each to the object store before the next is built)."""
    from safetensors.torch import save

    tensors = _prepare(state_dict)
    plan = plan_buckets([(n, _nbytes(t)) for n, t in tensors.items()], bucket_bytes)
    for i, names in enumerate(plan):
        meta = {**(metadata or {}), "bucket": str(i), "num_buckets": str(len(plan))}
        yield save({n: tensors[n] for n in names}, metadata=meta)


def serialize_buckets(
    state_dict: Mapping[str, torch.Tensor],
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    metadata: Mapping[str, str] | None = None,
) -> list[bytes]:
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
    tensors = _prepare(state_dict)
    plan = plan_buckets([(n, _nbytes(t)) for n, t in tensors.items()], bucket_bytes)
    paths = []
    for i, names in enumerate(plan):
        path = out_dir / f"{prefix}-{i:05d}-of-{len(plan):05d}.safetensors"
        meta = {**(metadata or {}), "bucket": str(i), "num_buckets": str(len(plan))}
        # save_file opens the path it is given: give it a mkstemp file, and rename (which replaces a link
        # planted at `path` instead of writing through it)
        tmp = private_temp_file(out_dir, path.name)
        save_file({n: tensors[n] for n in names}, str(tmp), metadata=meta)
        os.replace(tmp, path)
        paths.append(path)
    return paths


def write_blobs(blobs: Sequence[bytes], out_dir: str | Path, prefix: str = "weights") -> list[Path]:
    """Write already-serialized safetensors buckets (from `serialize_buckets`) as files."""
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
    return private_dir(f"relay-weights-{os.getpid()}-", needed_bytes, what="weight transfer")


def model_bytes(model_dir: str | Path, bytes_per_param: int = 4) -> int:
    """Size of a model folder's weights exported at `bytes_per_param` (4: fp32, the most a learner exports),
    from the safetensors headers."""
    return bytes_per_param * sum(math.prod(spec.shape) for spec in model_dir_manifest(model_dir).values())


# ---------------------------------------------------------------------------------------------------------
# The push.


def _actor(g: Any) -> Any:
    return getattr(g, "actor", g)  # accept GeneratorClient wrappers as well as raw handles


def push_weights(
    generators: Sequence[Any],
    state_dict: Mapping[str, torch.Tensor],
    version: int,
    strategy: str = "auto",
    timeout_s: float = DEFAULT_PUSH_TIMEOUT_S,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    allow_partial: bool = False,
    rewind: bool = False,
) -> dict[str, Any]:
    """Load `state_dict` into every generator as weight version `version`; return timings.

    `generators`: Generator actor handles (or `GeneratorClient`s). `strategy`: "shm" (all on this node),
    "object_store", or "auto" (shm for generators on the caller's node, object store for the others).
    `rewind`: `version` may be older than the generators' (a run that went back to a checkpoint).
    Raises WeightUpdateError naming the generators that failed, or RemoteCallTimeout after `timeout_s`;
    transfer files are removed in every case. A generator that failed keeps its old version and refuses to
    generate if its engine was left half-loaded (see `Generator.update_weights`).
    """
    import ray

    from relay.cluster.calls import RemoteCallTimeout

    if strategy not in ("auto", "shm", "object_store"):
        raise ValueError(f"push_weights: unknown strategy {strategy!r} (auto, shm, object_store)")
    if not generators:
        return {"version": version, "generators": 0}
    deadline = time.monotonic() + timeout_s
    actors = [_actor(g) for g in generators]
    total_bytes = sum(_nbytes(t) for t in state_dict.values())
    meta = {"relay_version": str(version)}

    def remaining() -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise RemoteCallTimeout(f"push_weights v{version} did not finish within {timeout_s:.0f} s")
        return left

    start = time.perf_counter()
    if strategy == "auto":
        here = ray.get_runtime_context().get_node_id()
        nodes = ray.get([a.node_id.remote() for a in actors], timeout=remaining())
        kinds = ["shm" if n == here else "object_store" for n in nodes]
    else:
        kinds = [strategy] * len(actors)

    timings: dict[str, Any] = {"version": version, "bytes": total_bytes, "mb": total_bytes / 2**20}
    refs: list[Any] = []
    owners: list[int] = []
    folder: Path | None = None
    try:
        if "shm" in kinds:
            t = time.perf_counter()
            folder = new_transfer_folder(total_bytes)
            paths = [str(p) for p in write_buckets(state_dict, folder, bucket_bytes, metadata=meta)]
            timings["write_s"] = time.perf_counter() - t
            timings["buckets"] = len(paths)
            timings["shm_dir"] = str(folder.parent)
            remaining()  # nothing is sent once the deadline has passed
            for i, a in enumerate(actors):
                if kinds[i] == "shm":
                    refs.append(a.update_weights.remote(paths, version, allow_partial=allow_partial, rewind=rewind))
                    owners.append(i)
        if "object_store" in kinds:
            t = time.perf_counter()
            blob_refs = [ray.put(b) for b in iter_serialized_buckets(state_dict, bucket_bytes, metadata=meta)]
            timings["put_s"] = time.perf_counter() - t
            timings["buckets"] = len(blob_refs)
            remaining()
            for i, a in enumerate(actors):
                if kinds[i] == "object_store":
                    # Top-level ObjectRef arguments are resolved by Ray on the receiving node.
                    ref = a.update_weights_from_blobs.remote(version, *blob_refs, allow_partial=allow_partial,
                                                             rewind=rewind)
                    refs.append(ref)
                    owners.append(i)
        # Wait for all, then report every failure together (not just the first one).
        ready, not_ready = ray.wait(refs, num_returns=len(refs), timeout=remaining())
        if not_ready:
            late = [owners[refs.index(r)] for r in not_ready]
            raise RemoteCallTimeout(
                f"push_weights v{version}: generators {late} did not load within {timeout_s:.0f} s")
        reports: list[dict[str, Any] | None] = [None] * len(actors)
        failures = []
        for i, ref in zip(owners, refs):
            try:
                reports[i] = ray.get(ref, timeout=0)  # finished: ray.wait returned it
            except Exception as err:  # noqa: BLE001 - collected and re-raised below with context
                failures.append(f"generator {i}: {type(err).__name__}: {str(err).strip().splitlines()[-1][:300]}")
        if failures:
            raise WeightUpdateError(
                f"push_weights v{version} failed on {len(failures)} generator(s): " + " | ".join(failures))
    finally:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
    timings["strategies"] = kinds
    timings["per_generator"] = reports
    timings["load_s"] = max(r["load_s"] for r in reports if r)
    timings["total_s"] = time.perf_counter() - start
    logger.info(
        "pushed weights v%d to %d generator(s): %.1f MB in %s bucket(s), load %.3f s (max), total %.3f s (%s)",
        version, len(actors), timings["mb"], timings.get("buckets"), timings["load_s"], timings["total_s"],
        ",".join(sorted(set(kinds))),
    )
    return timings
