"""Weight transport: the process that holds the weights (a learner's rank 0) sends them straight to the generators.

The driver never holds the tensors. It builds a `WeightPush` (generator handles, their Ray node ids, the
version) and hands it to the sender, which calls it with its full state dict (`LearnerGroup.publish_weights`);
the push writes each size-bounded safetensors bucket once (`relay.actors.weight_sync`) and then, per
generator, by node id (`choose_transports`), never by whether a path happens to exist:

* ``shm``: a generator on the sender's node loads bucket files the sender wrote, straight from the tensors, to
  a private folder in its node's /dev/shm (on disk when /dev/shm is missing or too small); one write, N
  memory-mapped reads. The folder is removed after the push, or with `reuse` (what `GeneratorPool` asks for)
  kept by the sender for its next push, which overwrites the files in place: reusing their pages costs a
  fifth of filling fresh ones. A push after which a reader may still map the files (a late or failed
  generator, an engine whose parameters alias the file) removes the folder instead.
* ``object_store``: a generator on another node gets the buckets' ObjectRefs; Ray moves the bytes (a uint8
  array of the file's bytes: numpy has no bfloat16) to its node, where it writes them to its own /dev/shm and
  loads them the same way.

With `keep` (what `GeneratorPool` asks for) the buckets also stay in the object store after the push and the
report carries their refs. The sender owns those objects (they live as long as it does and someone holds a
ref); the pool holds only the refs and gives them to generators that start later (a replacement, `relay
scale`), which then load the weights without the sender or the driver copying anything.

A generator that fails or is late does not raise here: the report lists it (`failures`, `late`), and
`push_error` turns that into the WeightUpdateError / RemoteCallTimeout the caller acts on, so a push run inside
a learner never fails the learner's collective for a generator's sake.
"""
from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from relay.actors.weight_sync import (
    DEFAULT_BUCKET_BYTES,
    TRANSFER_STEM,
    WeightUpdateError,
    bucket_plan,
    new_transfer_folder,
    pack_bucket,
    write_bucket_file,
)
from relay.scratch import ReusedDir, reused_dir

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

DEFAULT_PUSH_TIMEOUT_S = 600.0
STRATEGIES = ("auto", "shm", "object_store")


def choose_transports(sender_node: str, generator_nodes: Sequence[str | None], strategy: str = "auto") -> list[str]:
    """Per generator, "shm" or "object_store", from Ray node ids alone (a path that exists on this machine says
    nothing about another node: a simulated cluster shares one /dev/shm between its "nodes").

    "auto": shm exactly for generators on `sender_node`; "object_store": every generator; "shm": every
    generator, which must then all be on `sender_node` (ValueError naming the others). A None node id (not
    known) is treated as another node: the object store works from anywhere."""
    if strategy not in STRATEGIES:
        raise ValueError(f"weight push strategy must be one of {', '.join(STRATEGIES)}, not {strategy!r}")
    if strategy == "object_store":
        return ["object_store"] * len(generator_nodes)
    if strategy == "shm":
        away = [i for i, n in enumerate(generator_nodes) if n != sender_node]
        if away:
            raise ValueError(f"weight push strategy 'shm': generators {away} are not on the sender's node "
                             f"{sender_node}; use 'auto' or 'object_store'")
        return ["shm"] * len(generator_nodes)
    return ["shm" if n == sender_node else "object_store" for n in generator_nodes]


def _actor(g: Any) -> Any:
    return getattr(g, "actor", g)  # accept GeneratorClient wrappers as well as raw handles


def _short(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[-1][:300] if lines else ''}"


@dataclass
class WeightPush:
    """One weight update for a set of generators; a picklable callable run by the process holding the weights
    (`push(state_dict) -> report`). Built by the driver, which passes only handles and numbers."""

    generators: list[Any]
    """Generator actor handles (or `GeneratorClient`s)."""
    version: int
    """Weight version the generators take; newer than theirs unless `rewind`."""
    nodes: list[str | None] | None = None
    """Ray node id of each generator (what `Generator.ready` reports); None entries (or None) are asked."""
    strategy: str = "auto"
    """auto (by node id), shm (all on the sender's node) or object_store; see `choose_transports`."""
    timeout_s: float = DEFAULT_PUSH_TIMEOUT_S
    """For the whole push; generators not done by then are reported `late`."""
    bucket_bytes: int = DEFAULT_BUCKET_BYTES
    """Most tensor bytes per safetensors bucket."""
    allow_partial: bool = False
    """The update may leave out tensors (the generators keep theirs)."""
    rewind: bool = False
    """`version` may be older than the generators' (a run that went back to a checkpoint)."""
    keep: bool = False
    """Leave the buckets in the object store and return their refs (`blobs`), for generators that start later."""
    names: list[str] = field(default_factory=list)
    """Generator names for messages (default: their positions)."""
    reuse: bool = False
    """Keep the shared-memory transfer folder in the sending process for its next push (`relay.scratch.
    reused_dir`; removed when that process ends)."""

    def __post_init__(self) -> None:
        choose_transports("", [], self.strategy)  # validates the strategy name
        if self.nodes is not None and len(self.nodes) != len(self.generators):
            raise ValueError(f"WeightPush: {len(self.nodes)} node ids for {len(self.generators)} generators")
        if not self.timeout_s > 0 or self.bucket_bytes <= 0:
            raise ValueError("WeightPush: timeout_s and bucket_bytes must be > 0")

    def label(self, i: int) -> str:
        return self.names[i] if i < len(self.names) else f"generator {i}"

    def __call__(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        """Send `state_dict` (HF names, any device) to every generator; return the report (see module doc)."""
        import ray

        start, deadline = time.perf_counter(), time.monotonic() + self.timeout_s
        actors = [_actor(g) for g in self.generators]
        total = sum(t.numel() * t.element_size() for t in state_dict.values())
        here = ray.get_runtime_context().get_node_id()
        nodes, failures, unasked = self._locate(actors, deadline)
        targets = [i for i in range(len(actors)) if i not in failures and i not in unasked]
        chosen = dict(zip(targets, choose_transports(here, [nodes[i] for i in targets], self.strategy)))
        report: dict[str, Any] = {
            "version": self.version, "generators": len(actors), "bytes": total, "mb": total / 2**20,
            "sender_node": here, "sender_pid": os.getpid(), "failures": failures, "late": [], "blobs": [],
            "strategies": [chosen.get(i, "-") for i in range(len(actors))],  # "-": not sent (no node id in time)
            "per_generator": [None] * len(actors)}
        shm = [i for i in targets if chosen[i] == "shm"]
        store = [i for i in targets if chosen[i] == "object_store"]
        with self._folder(total, bool(shm)) as lease:
            refs: dict[Any, int] = {}
            kw = {"allow_partial": self.allow_partial, "rewind": self.rewind}
            t = time.perf_counter()
            paths = self._write_files(state_dict, lease.path, report) if lease is not None else []
            if lease is not None:
                report["shm_dir"] = str(lease.path.parent)
            if time.monotonic() < deadline:  # nothing is sent once the deadline has passed
                for i in shm:
                    refs[actors[i].update_weights.remote(paths, self.version, **kw)] = i
            # the object-store copy is made while those generators load
            blobs = self._put_blobs(state_dict, paths, report) if store or self.keep else []
            report["buckets"], report["write_s"] = max(len(paths), len(blobs)), time.perf_counter() - t
            if time.monotonic() < deadline:
                for i in store:
                    # Top-level ObjectRef arguments are resolved by Ray on the receiving node.
                    refs[actors[i].update_weights_from_blobs.remote(self.version, *blobs, **kw)] = i
            ready, not_ready = (ray.wait(list(refs), num_returns=len(refs),
                                         timeout=max(0.0, deadline - time.monotonic())) if refs else ([], []))
            sent = set(refs.values())
            report["late"] = sorted([refs[r] for r in not_ready] + [i for i in targets if i not in sent] + unasked)
            for ref in ready:
                try:
                    report["per_generator"][refs[ref]] = ray.get(ref, timeout=0)
                except Exception as err:  # noqa: BLE001 - collected; `push_error` raises them together
                    failures[refs[ref]] = _short(err)
            if lease is not None and (report["late"] or failures or _aliases_files(report["per_generator"])):
                lease.discard()  # a reader may still map these files: never overwrite them
            if self.keep:
                report["blobs"] = blobs
        loads = [r["load_s"] for r in report["per_generator"] if r]
        report["load_s"] = max(loads) if loads else 0.0
        report["total_s"] = time.perf_counter() - start
        logger.info("pushed weights v%d from node %s to %d generator(s) (%s): %.1f MB in %s bucket(s), load %.3f s "
                    "(max), total %.3f s, %d failed, %d late", self.version, here[:8], len(actors),
                    ",".join(sorted(set(chosen.values()))) or "-", report["mb"], report.get("buckets"),
                    report["load_s"], report["total_s"], len(failures), len(report["late"]))
        return report

    def _locate(self, actors: list[Any], deadline: float) -> tuple[list[str | None], dict[int, str], list[int]]:
        """Each generator's node id (given, else asked now), the ones that failed to answer (dead: failures) and
        the ones that did not answer in time (late)."""
        import ray

        nodes = list(self.nodes) if self.nodes is not None else [None] * len(actors)
        failures: dict[int, str] = {}
        unasked: list[int] = []
        unknown = [i for i, n in enumerate(nodes) if n is None]
        if unknown:
            probes = [actors[i].node_id.remote() for i in unknown]
            _, slow = ray.wait(probes, num_returns=len(probes), timeout=max(0.0, deadline - time.monotonic()))
            for i, ref in zip(unknown, probes):
                if ref in slow:
                    unasked.append(i)
                    continue
                try:
                    nodes[i] = ray.get(ref, timeout=0)
                except Exception as err:  # noqa: BLE001 - a dead generator is reported, not raised
                    failures[i] = f"node_id: {_short(err)}"
        return nodes, failures, unasked

    @contextmanager
    def _folder(self, total: int, needed: bool) -> Iterator[ReusedDir | None]:
        """The transfer folder for this push (None when no generator reads files): fresh and removed after,
        or, with `reuse`, this process's kept one."""
        if not needed:
            yield None
        elif self.reuse:
            with reused_dir("weight-transfer", TRANSFER_STEM, total, what="weight transfer") as lease:
                yield lease
        else:
            folder = new_transfer_folder(total)
            try:
                yield ReusedDir(folder, reused=False)
            finally:
                shutil.rmtree(folder, ignore_errors=True)

    def _write_files(self, state_dict: Mapping[str, torch.Tensor], folder: Path, report: dict[str, Any]) -> list[str]:
        """Each bucket straight from the tensors into a file in `folder` (overwriting the last push's files in
        a reused folder: `overwritten` in `report` counts them); the seconds go to `report` as serialize_s
        (planning) and file_s."""
        spent = dict.fromkeys(("serialize_s", "file_s"), 0.0)
        paths = []
        overwritten = 0
        t = time.perf_counter()
        meta = {"relay_version": str(self.version)}
        buckets = bucket_plan(state_dict, self.bucket_bytes, metadata=meta, unshare=False)
        for i, (bucket, bucket_meta) in enumerate(buckets):
            t = _lap(spent, "serialize_s", t)
            path = folder / f"weights-{i:05d}.safetensors"
            overwritten += path.is_file()
            write_bucket_file(bucket, path, bucket_meta, overwrite=True)
            paths.append(str(path))
            t = _lap(spent, "file_s", t)
        for stale in set(folder.glob("weights-*.safetensors")) - set(map(Path, paths)):
            stale.unlink()  # a reused folder's buckets from a push with more of them
        report.update(spent, overwritten=overwritten)
        return paths

    def _put_blobs(self, state_dict: Mapping[str, torch.Tensor], paths: list[str],
                   report: dict[str, Any]) -> list[Any]:
        """`ray.put` each bucket's bytes (the sender owns those objects): read from its file in `paths` when
        there are files, else packed from the tensors (`pack_bucket`). One bucket's bytes are held at a time.
        Adds put_s (and the packing to serialize_s)."""
        import numpy as np
        import ray

        spent = {"serialize_s": report.get("serialize_s", 0.0), "put_s": 0.0}
        if paths:
            blobs = (np.asarray(np.memmap(p, dtype=np.uint8, mode="r")) for p in paths)
        else:
            meta = {"relay_version": str(self.version)}
            plan = bucket_plan(state_dict, self.bucket_bytes, meta, unshare=False)
            blobs = (pack_bucket(b, metadata=m) for b, m in plan)
        refs = []
        t = time.perf_counter()
        for blob in blobs:
            t = _lap(spent, "serialize_s", t)
            refs.append(ray.put(blob))
            t = _lap(spent, "put_s", t)
        report.update(spent)
        return refs


def _aliases_files(reports: Sequence[Mapping[str, Any] | None]) -> bool:
    """Some engine kept a parameter that is the loaded file's memory (`RelayWorkerExtension` checks): the
    files must not be overwritten while it lives."""
    return any(w.get("aliases_files") for r in reports if r for w in r.get("workers") or [] if isinstance(w, Mapping))


def _lap(spent: dict[str, float], key: str, since: float) -> float:
    now = time.perf_counter()
    spent[key] += now - since
    return now


def push_error(report: Mapping[str, Any], push: WeightPush | None = None) -> Exception | None:
    """The error a push report stands for: RemoteCallTimeout when generators were late, else WeightUpdateError
    naming every generator that failed; None when all loaded."""
    from relay.cluster.calls import RemoteCallTimeout

    label = push.label if push is not None else (lambda i: f"generator {i}")
    version = report["version"]
    if report.get("late"):
        late = [label(i) for i in report["late"]]
        timeout = f" within {push.timeout_s:.0f} s" if push is not None else ""
        return RemoteCallTimeout(f"push_weights v{version}: {late} did not load{timeout}")
    failures = report.get("failures") or {}
    if failures:
        return WeightUpdateError(f"push_weights v{version} failed on {len(failures)} generator(s): "
                                 + " | ".join(f"{label(int(i))}: {msg}" for i, msg in sorted(failures.items())))
    return None


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
    """Send `state_dict`, held by this process, to `generators` as `version`; return the report, or raise
    WeightUpdateError naming the generators that failed / RemoteCallTimeout after `timeout_s`. For tools and
    tests whose weights are in their own process; a run pushes from its learner (`WeightPush`)."""
    if not generators:
        return {"version": version, "generators": 0}
    push = WeightPush(list(generators), version, strategy=strategy, timeout_s=timeout_s, bucket_bytes=bucket_bytes,
                      allow_partial=allow_partial, rewind=rewind)
    report = push(state_dict)
    if (err := push_error(report, push)) is not None:
        raise err
    return report


def local_sender(state_dict: Mapping[str, torch.Tensor]) -> Any:
    """A `GeneratorPool.push_weights` sender for weights held in this very process (tests, tools): the push
    runs here. A run's sender is its learner (`LearnerGroup.publish_weights`)."""
    return lambda push: push(state_dict)
