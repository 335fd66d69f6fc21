"""`Generator`: a Ray actor wrapping one vLLM engine (`vllm.LLM`) on a local model folder.

vLLM is imported inside the actor only: importing it rewrites process environment variables (LD_PRELOAD,
VLLM_WORKER_MULTIPROC_METHOD, ...) that every child process inherits, so it must never run in a driver or a
learner. Each engine gets its own actor.

On CPU the engine runs in-process by default (VLLM_ENABLE_V1_MULTIPROCESSING=0): measured on the tiny test
Llama (32 prompts x 64 tokens, 1 thread, fp32), in-process made 6.7k tok/s keeping 1.0 core busy and started
in 5.8 s; the default multi-process mode made 8.5k tok/s but kept 2.0 cores busy (its scheduler busy-polls a
core) and started in 19 s. Per core in-process wins by 1.5x, and on a 2-core machine it leaves a core for the
learners. On GPU the multi-process mode is the default (scheduling overlaps GPU work, and tensor parallelism
needs worker processes).

Weights are updated in place through `RelayWorkerExtension` (see `vllm_worker_ext` and `weight_sync`). An
update is validated against the model's tensor names and shapes before the engine is touched, because a
reload that fails half way leaves vLLM's model unusable; if loading still fails, the generator marks itself
broken and every later `generate` raises until it is restarted: it never serves old weights under a new
version, nor new weights under an old one.

A multi-process engine's EngineCore process can die while the actor lives (OOM killer, a crash in a kernel):
`engine_watch.EngineWatch` notices, marks the generator broken (`health()` says so) and wakes a `generate` or
weight load blocked on it, which then raises `GeneratorBroken`; the pool replaces the generator as if the actor
had died. `ready()` and `health()` list the engine's process ids (`engine_pids`; empty in-process).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import ray

from relay.actors.engine_watch import EngineWatch, engine_procs, is_engine_death
from relay.actors.sampling import GenerationResult, SamplingConfig
from relay.actors.weight_sync import (
    WeightUpdateError,
    check_update,
    model_dir_manifest,
    new_transfer_folder,
    read_manifest,
    write_blobs,
)
from relay.cluster.calls import get
from relay.cluster.options import actor_options

logger = logging.getLogger(__name__)

WORKER_EXTENSION = "relay.actors.vllm_worker_ext.RelayWorkerExtension"


@dataclass
class GeneratorConfig:
    """How to start one vLLM engine."""

    model: str
    """Local HF model folder (config, tokenizer, safetensors)."""
    dtype: str = "float32"
    """Engine dtype: "float32", "bfloat16", "float16" or "auto" (the checkpoint's). fp32 is fastest for tiny
    models on CPU and makes logprobs match a fp32 learner to ~1e-6. bf16 on a CPU without AVX512_BF16/AMX is
    emulated (slow): kept, with a one-line warning (`cpu_dtype_note`)."""
    max_model_len: int | None = None
    """Prompt + response token limit; None = the model's maximum."""
    seed: int = 0
    """Engine seed (requests without their own seed draw from it)."""
    enable_prefix_caching: bool = True
    """Reuse KV of shared prompt prefixes (GRPO groups, chat templates); reset after every weight update."""
    tensor_parallel_size: int = 1
    """GPUs per engine (GPU only; the actor asks Ray for that many)."""
    gpu_memory_utilization: float = 0.85
    """GPU: fraction of GPU memory for weights + KV cache. Ignored on CPU (see `cpu_kvcache_gib`)."""
    cpu_kvcache_gib: int = 1
    """CPU: KV cache size in GiB (VLLM_CPU_KVCACHE_SPACE); vLLM's own default reserves most of the RAM."""
    enforce_eager: bool | None = None
    """No torch.compile / CUDA graphs. None = True on CPU (compiling cost ~46 s and ran slower), False on GPU."""
    in_process: bool | None = None
    """Run the engine inside the actor process (VLLM_ENABLE_V1_MULTIPROCESSING=0). None = True on CPU (half
    the CPU for the same tokens, see the module docstring), False on GPU."""
    cpu_threads: int = 1
    """CPU: torch/OpenMP threads of the engine (fixed at start: vLLM disables torch.set_num_threads)."""
    cpu_threads_bind: str | None = None
    """CPU, multi-process mode: VLLM_CPU_OMP_THREADS_BIND, e.g. "0", "1", "2-3" or "nobind". Engines that
    share a machine need distinct values, or all bind to the same core. None = vLLM's "auto"."""
    max_num_seqs: int | None = None
    """Maximum sequences per engine step; None = vLLM's default."""
    trust_remote_code: bool = False
    """Allow model code from the model folder (off: only architectures vLLM ships)."""
    run_dir: str | None = None
    """Folder for vLLM's sockets (VLLM_RPC_BASE_PATH); None = a temp folder removed at shutdown. Keeps /tmp clean
    across many engine starts. vLLM's caches stay where vLLM keeps them (VLLM_CACHE_ROOT, default ~/.cache/vllm):
    a cold model-info cache costs every engine start a subprocess that imports vLLM (17 s of a 26 s start on a
    2-core AVX2 machine)."""
    engine_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments for `vllm.LLM` (escape hatch; they win over the fields above)."""

    def __post_init__(self) -> None:
        if self.tensor_parallel_size < 1 or self.cpu_threads < 1 or self.cpu_kvcache_gib < 1:
            raise ValueError("GeneratorConfig: tensor_parallel_size, cpu_threads and cpu_kvcache_gib must be >= 1")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError("GeneratorConfig.gpu_memory_utilization must be in (0, 1]")


def cpu_dtype_note(dtype: str, hf_config: dict[str, Any]) -> str | None:
    """One line when a CPU engine will compute in bf16 (asked for, or "auto" on a bf16 checkpoint) on a CPU
    without AVX512_BF16/AMX, where bf16 is emulated; the choice is kept. None otherwise."""
    resolved = dtype if dtype != "auto" else str(hf_config.get("torch_dtype") or hf_config.get("dtype") or "")
    if resolved != "bfloat16":
        return None
    from relay.cpu import bf16_slow_reason

    slow = bf16_slow_reason()
    if slow is None:
        return None
    if "quantization_config" in hf_config:
        return f"dtype {dtype} kept (vLLM's int4 kernels need 16-bit activations), but {slow}"
    return f"dtype {dtype} kept as asked, but {slow}; dtype float32 is faster on this CPU"


class GeneratorBroken(RuntimeError):
    """The engine cannot serve: its weights are in an unknown state after a failed update, or its engine
    process died. Restart the generator."""


def _to_sampling_params(cfg: SamplingConfig, prompt_index: int):
    from vllm import SamplingParams

    seed = None
    if cfg.seed is not None:
        # vLLM seeds child sample j of a request with seed + j: spacing prompts by n keeps every (prompt,
        # sample) stream distinct, so duplicated prompts in a batch still get different samples.
        seed = cfg.seed + prompt_index * cfg.n
    return SamplingParams(
        n=cfg.n,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        top_k=cfg.top_k or 0,  # 0 = off in vLLM
        max_tokens=cfg.max_tokens,
        stop_token_ids=list(cfg.stop_token_ids),
        seed=seed,
        ignore_eos=cfg.ignore_eos,
        logprobs=0,  # only the sampled token's logprob
        detokenize=False,  # learners need ids; skipping text saves time
    )


class VLLMGenerator:
    """One vLLM engine plus a weight version. Use through the `Generator` Ray actor (`start_generator`)."""

    def __init__(self, config: GeneratorConfig | dict[str, Any]):
        start = time.perf_counter()
        self.config = config if isinstance(config, GeneratorConfig) else GeneratorConfig(**config)
        cfg = self.config
        self._version = 0
        self._broken: str | None = None
        self._busy_since: float | None = None
        model_dir = Path(cfg.model)
        self._manifest = model_dir_manifest(model_dir)
        hf_config = json.loads((model_dir / "config.json").read_text())
        self._tied = bool(hf_config.get("tie_word_embeddings", False))

        import torch

        on_gpu = torch.cuda.is_available()
        self._device = "cuda" if on_gpu else "cpu"
        in_process = cfg.in_process if cfg.in_process is not None else not on_gpu
        self._in_process = in_process
        self._own_run_dir = cfg.run_dir is None
        self._run_dir = Path(cfg.run_dir or tempfile.mkdtemp(prefix="relay-vllm-"))
        (self._run_dir / "rpc").mkdir(parents=True, exist_ok=True)
        # vLLM reads these lazily, at import or engine start: set them before importing it.
        env = {
            "VLLM_ENABLE_V1_MULTIPROCESSING": "0" if in_process else "1",
            "VLLM_RPC_BASE_PATH": str(self._run_dir / "rpc"),
        }
        if not on_gpu:
            env["VLLM_CPU_KVCACHE_SPACE"] = str(cfg.cpu_kvcache_gib)
            env["OMP_NUM_THREADS"] = str(cfg.cpu_threads)
            if cfg.cpu_threads_bind:
                env["VLLM_CPU_OMP_THREADS_BIND"] = cfg.cpu_threads_bind
            torch.set_num_threads(cfg.cpu_threads)  # in-process: the worker freezes the count afterwards
        os.environ.update(env)
        if not on_gpu:
            note = cpu_dtype_note(cfg.dtype, hf_config)
            if note:
                logger.warning("generator pid %d: %s", os.getpid(), note)

        from vllm import LLM

        kwargs: dict[str, Any] = dict(
            model=str(model_dir),
            dtype=cfg.dtype,
            seed=cfg.seed,
            enforce_eager=cfg.enforce_eager if cfg.enforce_eager is not None else not on_gpu,
            enable_prefix_caching=cfg.enable_prefix_caching,
            trust_remote_code=cfg.trust_remote_code,
            worker_extension_cls=WORKER_EXTENSION,
        )
        if cfg.max_model_len:
            kwargs["max_model_len"] = cfg.max_model_len
        if cfg.max_num_seqs:
            kwargs["max_num_seqs"] = cfg.max_num_seqs
        if on_gpu:
            kwargs["tensor_parallel_size"] = cfg.tensor_parallel_size
            kwargs["gpu_memory_utilization"] = cfg.gpu_memory_utilization
        else:
            # A prompt prefilled in chunks rewinds its request's seeded RNG, which CPU generators cannot do
            # ("CPU Generator does not use offset"): every seeded batch whose prompts exceed one step's token
            # budget failed. Without chunking a prompt waits for the next step instead.
            kwargs["enable_chunked_prefill"] = False
            longest = cfg.max_model_len or int(hf_config.get("max_position_embeddings") or 0)
            kwargs["max_num_batched_tokens"] = max(4096, longest)  # vLLM: >= max_model_len without chunking
        kwargs.update(cfg.engine_kwargs)
        self.llm = LLM(**kwargs)
        procs = engine_procs(self.llm)  # None in-process: the engine then dies only with this actor
        self._watch = EngineWatch(procs, self._engine_died).start() if procs else None
        self._start_s = time.perf_counter() - start
        logger.info("generator pid %d: %s engine on %s started in %.1f s", os.getpid(),
                    "in-process" if in_process else "multi-process", self._device, self._start_s)

    def _engine_died(self, reason: str) -> None:
        """EngineWatch's callback (its thread): from now on every call raises GeneratorBroken."""
        busy = self._busy_since
        doing = f"while generating for {time.monotonic() - busy:.1f} s" if busy is not None else "while idle"
        self._broken = self._broken or f"{reason} {doing}"
        logger.error("generator pid %d: %s", os.getpid(), self._broken)

    def _engine_pids(self) -> list[int]:
        return self._watch.procs.pids if self._watch is not None else []

    def _broken_error(self, err: BaseException) -> GeneratorBroken | None:
        """GeneratorBroken for an error that came from a dead engine (the watch may not have noticed yet)."""
        if not (self._broken or is_engine_death(err)):
            return None
        self._broken = self._broken or f"vLLM engine died ({type(err).__name__}: {err})"
        return GeneratorBroken(self._broken)

    # -- control: cheap, in their own concurrency group, answered even while a generate call runs ----------

    @ray.method(concurrency_group="control")
    def pid(self) -> int:
        return os.getpid()

    @ray.method(concurrency_group="control")
    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    @ray.method(concurrency_group="control")
    def version(self) -> int:
        return self._version

    @ray.method(concurrency_group="control")
    def ready(self) -> dict[str, Any]:
        """Engine is up: pid, engine process ids, node, version, mode and start time."""
        return {
            "pid": os.getpid(),
            "engine_pids": self._engine_pids(),
            "node_id": self.node_id(),
            "version": self._version,
            "device": self._device,
            "in_process": self._in_process,
            "start_s": self._start_s,
            "model": self.config.model,
        }

    @ray.method(concurrency_group="control")
    def health(self) -> dict[str, Any]:
        busy = self._busy_since
        return {
            "ok": self._broken is None,
            "broken": self._broken,
            "version": self._version,
            "pid": os.getpid(),
            "engine_pids": self._engine_pids(),
            "busy_s": time.monotonic() - busy if busy is not None else 0.0,
            "placement_group": ray.get_runtime_context().get_placement_group_id(),
        }

    # -- work (serialized: one at a time, so an update never interleaves with a generate) --------------------

    def generate(
        self, prompt_token_ids: list[list[int]], sampling: SamplingConfig | dict[str, Any] | None = None
    ) -> list[GenerationResult]:
        """Sample `sampling.n` responses per prompt; results are prompt-major (prompt 0 samples 0..n-1, ...)."""
        if self._broken:
            raise GeneratorBroken(self._broken)
        if sampling is None:
            sampling = SamplingConfig()
        elif isinstance(sampling, dict):
            sampling = SamplingConfig(**sampling)
        if not prompt_token_ids:
            return []
        version = self._version
        prompts = [{"prompt_token_ids": list(map(int, p))} for p in prompt_token_ids]
        params = [_to_sampling_params(sampling, i) for i in range(len(prompts))]
        self._busy_since = time.monotonic()
        try:
            outputs = self.llm.generate(prompts, params, use_tqdm=False)
        except Exception as err:
            if (broken := self._broken_error(err)) is not None:
                raise broken from err
            raise
        finally:
            self._busy_since = None
        results: list[GenerationResult] = []
        for i, out in enumerate(outputs):
            for completion in sorted(out.outputs, key=lambda c: c.index):
                ids = list(completion.token_ids)
                # With logprobs=0 each position holds the sampled token (vLLM always adds it).
                lps = [float(step[tok].logprob) for tok, step in zip(ids, completion.logprobs or [])]
                if len(lps) != len(ids):
                    raise RuntimeError(f"vLLM returned {len(lps)} logprobs for {len(ids)} tokens")
                results.append(GenerationResult(
                    prompt_index=i,
                    sample_index=completion.index,
                    prompt_token_ids=list(prompts[i]["prompt_token_ids"]),
                    token_ids=ids,
                    logprobs=lps,
                    finish_reason=str(completion.finish_reason or "abort"),
                    weight_version=version,
                    stop_reason=completion.stop_reason,
                ))
        return results

    def update_weights(self, paths: list[str], version: int | None = None, allow_partial: bool = False,
                       rewind: bool = False) -> dict:
        """Load safetensors bucket files (HF names) in place, reset the prefix cache, set the version.

        `version` must be newer than the current one (None = current + 1) unless `rewind` (a run that went back
        to a checkpoint loads that checkpoint's older weights and version). Returns a report with the new
        version and timings. An update that does not fit the model raises WeightUpdateError and changes
        nothing; a failure while loading marks the generator broken (see GeneratorBroken).
        """
        if self._broken:
            raise GeneratorBroken(self._broken)
        new_version = self._version + 1 if version is None else int(version)
        if new_version <= self._version and not rewind:
            raise WeightUpdateError(f"weight version {new_version} is not newer than the loaded {self._version}")
        start = time.perf_counter()
        check_update(read_manifest(paths), self._manifest, allow_partial=allow_partial, tied_embeddings=self._tied)
        check_s = time.perf_counter() - start
        try:
            reports = self.llm.collective_rpc("relay_reload_from_files", args=(list(paths), allow_partial))
            # Cached prompt KV was computed with the old weights (measured: logprobs off by 1.7 without this).
            if not self.llm.reset_prefix_cache():
                raise RuntimeError("vLLM refused to reset the prefix cache")
        except Exception as err:
            if (broken := self._broken_error(err)) is not None:
                raise broken from err
            self._broken = f"weight update to v{new_version} failed while loading ({type(err).__name__}: {err})"
            logger.error("generator pid %d: %s", os.getpid(), self._broken)
            raise WeightUpdateError(self._broken) from err
        self._version = new_version
        total_s = time.perf_counter() - start
        return {"version": new_version, "check_s": check_s, "load_s": total_s, "workers": reports}

    def update_weights_from_blobs(self, version: int | None, *blobs: Any, allow_partial: bool = False,
                                  rewind: bool = False) -> dict:
        """Object-store path: safetensors buckets (uint8 arrays, resolved by Ray on this node) -> local files -> load."""
        start = time.perf_counter()
        folder = new_transfer_folder(sum(len(b) for b in blobs))
        try:
            paths = [str(p) for p in write_blobs(blobs, folder)]
            write_s = time.perf_counter() - start
            report = self.update_weights(paths, version, allow_partial=allow_partial, rewind=rewind)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        report["write_s"] = write_s
        report["load_s"] = time.perf_counter() - start
        return report

    def param_sums(self, names: list[str]) -> dict[str, float]:
        """float64 sums of engine parameters by vLLM name (a fingerprint for tests and debugging)."""
        return self.llm.collective_rpc("relay_param_sums", args=(list(names),))[0]

    def shutdown(self) -> None:
        """Free the engine and its temp folder (the actor can then be killed)."""
        if getattr(self, "_watch", None) is not None:
            self._watch.stop()  # the engine ends on purpose now: not a death to report
        llm = getattr(self, "llm", None)
        if llm is not None:
            del self.llm
        if self._own_run_dir:
            shutil.rmtree(self._run_dir, ignore_errors=True)


# Control methods (marked "control") get their own thread so pid()/health() answer while a long generate
# runs; generate and update_weights stay in the default group (one at a time): vLLM's LLM is not thread-safe.
Generator = ray.remote(concurrency_groups={"control": 2})(VLLMGenerator)


@dataclass
class GeneratorClient:
    """Driver-side handle: every call has a timeout (RemoteCallTimeout when exceeded)."""

    actor: Any
    name: str | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingConfig | None = None,
                 timeout_s: float = 600.0) -> list[GenerationResult]:
        return get(self.actor.generate.remote(prompt_token_ids, sampling), timeout_s, f"{self.name}.generate")

    def generate_async(self, prompt_token_ids: list[list[int]], sampling: SamplingConfig | None = None):
        """ObjectRef of `generate`; wait on it with `relay.cluster.calls.get(ref, timeout)`."""
        return self.actor.generate.remote(prompt_token_ids, sampling)

    def update_weights(self, paths: list[str], version: int | None = None, timeout_s: float = 300.0,
                       allow_partial: bool = False) -> dict:
        ref = self.actor.update_weights.remote(paths, version, allow_partial=allow_partial)
        return get(ref, timeout_s, f"{self.name}.update_weights")

    def version(self, timeout_s: float = 30.0) -> int:
        return get(self.actor.version.remote(), timeout_s, f"{self.name}.version")

    def pid(self, timeout_s: float = 30.0) -> int:
        return get(self.actor.pid.remote(), timeout_s, f"{self.name}.pid")

    def health(self, timeout_s: float = 30.0) -> dict[str, Any]:
        return get(self.actor.health.remote(), timeout_s, f"{self.name}.health")

    def param_sums(self, names: list[str], timeout_s: float = 60.0) -> dict[str, float]:
        return get(self.actor.param_sums.remote(names), timeout_s, f"{self.name}.param_sums")

    def kill(self, timeout_s: float = 30.0) -> None:
        """Free the engine, then end the actor."""
        try:
            get(self.actor.shutdown.remote(), timeout_s, f"{self.name}.shutdown")
        except Exception:  # noqa: BLE001 - the actor may already be dead; kill anyway
            pass
        ray.kill(self.actor)


def start_generator(
    config: GeneratorConfig,
    name: str | None = None,
    num_cpus: float | None = None,
    num_gpus: float | None = None,
    timeout_s: float = 300.0,
    **options: Any,
) -> GeneratorClient:
    """Start a Generator actor and wait until its engine is up (RemoteCallTimeout after `timeout_s`).

    Resources default to what the engine really uses: `cpu_threads` logical CPUs (+1 for the scheduler
    process when `in_process=False`), and `tensor_parallel_size` GPUs when the cluster has any GPU.
    """
    if num_cpus is None:
        num_cpus = float(config.cpu_threads + (1 if config.in_process is False else 0))
    if num_gpus is None:
        # A cluster with GPUs gets GPU engines: without a GPU quota Ray hides the devices from the actor.
        num_gpus = float(config.tensor_parallel_size) if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    env = {"OMP_NUM_THREADS": str(config.cpu_threads)}  # before torch is imported in the actor
    opts = actor_options(name=name, num_cpus=num_cpus, num_gpus=num_gpus, env=env, **options)
    actor = Generator.options(**opts).remote(asdict(config))
    info = get(actor.ready.remote(), timeout_s, f"generator {name or ''} start")
    return GeneratorClient(actor=actor, name=name or f"generator-{info['pid']}", info=info)
