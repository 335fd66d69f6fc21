"""What reaches the console, and where everything else goes.

A `relay` command prints Relay's own story (one progress bar per stage, one summary line per step or
episode, where the outputs went). Dependencies' output (vLLM engine dumps, ColossalAI extension warnings,
DDP FutureWarnings, transformers progress bars, Ray's `(pid=...)` lines) goes to SAVE_DIR/logs/*.log:

    SAVE_DIR/logs/driver.log          Python warnings and dependency log records of the driver process
    SAVE_DIR/logs/<actor>.log         everything an actor process (and its children) writes: stdout and
                                      stderr file descriptors, so C++ and subprocess output too;
                                      <actor> is the Ray actor name without "relay/" (generator-0,
                                      actor-rank0, sft-learner-rank1, ref, reward, buffer, ...)

`--verbose` (or RELAY_VERBOSE=1) turns all of that off: nothing is redirected, Ray forwards the actors'
output to the terminal as usual, and errors show their full traceback.

How it reaches the actors: the driver sets RELAY_LOG_DIR (and RELAY_VERBOSE); `relay.cluster.options.
actor_env` copies them, plus RELAY_LOG_ROLE (the actor's name), into every actor's runtime env, and
`relay.launch.cluster.init_ray` registers `worker_setup` as Ray's worker-process setup hook, which redirects the
process before the actor's module is even imported. Without RELAY_LOG_DIR (tests, library use) nothing changes.

This module imports nothing heavy and nothing else of Relay's: Ray workers import it at process start.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import Iterator

LOG_DIR_ENV = "RELAY_LOG_DIR"
VERBOSE_ENV = "RELAY_VERBOSE"
ROLE_ENV = "RELAY_LOG_ROLE"
SETUP_HOOK = "relay.logs.worker_setup"  # Ray runtime_env "worker_process_setup_hook"

# Progress bars off everywhere (in a log file they are only noise); read by huggingface_hub/transformers at import.
QUIET_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1"}
# The driver's console also drops dependency chatter below errors (transformers, datasets, wandb).
QUIET_DRIVER_ENV = {
    **QUIET_ENV,
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "DATASETS_VERBOSITY": "error",
    "WANDB_SILENT": "true",
}
# Loggers of dependencies whose records go to driver.log rather than the console.
DEPENDENCY_LOGGERS = ("vllm", "colossalai", "torch", "transformers", "datasets", "huggingface_hub", "peft",
                      "accelerate", "urllib3", "filelock", "fsspec", "wandb", "tensorboard", "bitsandbytes")

_driver_handler: logging.Handler | None = None
_driver_log: Path | None = None


# --------------------------------------------------------------------------------------------- state
def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() not in ("", "0", "false", "no", "off")


def is_verbose() -> bool:
    """--verbose / RELAY_VERBOSE=1: dependency output on the console, full tracebacks."""
    return _truthy(os.environ.get(VERBOSE_ENV))


def set_verbose(flag: bool) -> None:
    os.environ[VERBOSE_ENV] = "1" if flag else "0"


def log_dir() -> Path | None:
    """The folder actors started from now on write their logs to (None: not redirected)."""
    value = os.environ.get(LOG_DIR_ENV)
    return Path(value) if value and not is_verbose() else None


def role_file_name(role: str) -> str:
    """'relay/generator-0' -> 'generator-0.log' (anything but letters, digits, '.', '_', '-' becomes '_')."""
    role = role.removeprefix("relay/") or "worker"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", role)[:100] + ".log"


def actor_env_vars(name: str | None = None) -> dict[str, str]:
    """Variables an actor's runtime env needs for its logs (see `relay.cluster.options.actor_env`)."""
    env: dict[str, str] = {}
    if VERBOSE_ENV in os.environ:
        env[VERBOSE_ENV] = os.environ[VERBOSE_ENV]
    if is_verbose():
        return env
    if os.environ.get(LOG_DIR_ENV):
        env[LOG_DIR_ENV] = os.environ[LOG_DIR_ENV]
        env.update({k: os.environ.get(k, v) for k, v in QUIET_ENV.items()})
        if name:
            env[ROLE_ENV] = name.removeprefix("relay/").split("@", 1)[0]  # the run is in the folder already
    return env


# --------------------------------------------------------------------------------------------- driver
class _RelayConsole(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"[relay] {record.getMessage()}"


def quiet_console(verbose: bool | None = None) -> None:
    """Driver, before a command runs: dependency chatter off the console (or, verbose, everything on).

    Quiet: HF/transformers progress bars and advisory warnings off, Python warnings and dependency log
    records captured (to SAVE_DIR/logs/driver.log once `run_logs` names the folder, dropped before that),
    Relay's own warnings (e.g. a generator replaced) shown as `[relay] ...` lines.
    """
    if verbose is not None:
        set_verbose(verbose)
    if is_verbose():
        logging.captureWarnings(False)
        return
    for key, value in QUIET_DRIVER_ENV.items():
        os.environ.setdefault(key, value)
    if "transformers" in sys.modules:  # env vars are read at import; set the live switches too
        with contextlib.suppress(Exception):
            import transformers

            transformers.utils.logging.set_verbosity_error()
            transformers.utils.logging.disable_progress_bar()
    logging.captureWarnings(True)
    handler = _ensure_driver_handler()
    for name in ("py.warnings", *DEPENDENCY_LOGGERS):
        lg = logging.getLogger(name)
        if handler not in lg.handlers:
            lg.addHandler(handler)
        lg.propagate = False
    relay = logging.getLogger("relay")
    if not any(isinstance(h.formatter, _RelayConsole) for h in relay.handlers):
        console = logging.StreamHandler(sys.stderr)
        console.setLevel(logging.WARNING)
        console.setFormatter(_RelayConsole())
        relay.addHandler(console)
        relay.addHandler(handler)
        relay.setLevel(logging.INFO)
        relay.propagate = False


class _DriverLogHandler(logging.Handler):
    """Appends to the current run's driver.log; drops records while no run folder is known."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        self._file = None
        self._path: Path | None = None

    def point_to(self, path: Path | None) -> None:
        self.acquire()
        try:
            if self._file is not None:
                self._file.close()
            self._file, self._path = None, path
        finally:
            self.release()

    def emit(self, record: logging.LogRecord) -> None:
        if self._path is None:
            return
        try:
            if self._file is None:  # opened on the first record: no empty driver.log
                self._path.parent.mkdir(parents=True, exist_ok=True)
                self._file = open(self._path, "a", encoding="utf-8")
            self._file.write(self.format(record) + "\n")
            self._file.flush()
        except Exception:  # noqa: BLE001 - logging must never break a run
            self.handleError(record)


def _ensure_driver_handler() -> _DriverLogHandler:
    global _driver_handler
    if _driver_handler is None:
        _driver_handler = _DriverLogHandler()
    return _driver_handler  # type: ignore[return-value]


@contextlib.contextmanager
def run_logs(folder: str | Path) -> Iterator[Path | None]:
    """Within the block, actors started by this process write to FOLDER/<actor>.log and the driver's captured
    warnings to FOLDER/driver.log (not in verbose mode: then yields None and changes nothing)."""
    if is_verbose():
        yield None
        return
    folder = Path(folder).absolute()
    folder.mkdir(parents=True, exist_ok=True)
    before = os.environ.get(LOG_DIR_ENV)
    handler = _ensure_driver_handler()
    previous = handler._path
    os.environ[LOG_DIR_ENV] = str(folder)
    handler.point_to(folder / "driver.log")
    try:
        yield folder
    except Exception as err:  # the console gets one line (cli.main); the traceback is kept in driver.log
        handler.handle(logging.LogRecord("relay", logging.ERROR, __file__, 0, "the run failed", None,
                                         (type(err), err, err.__traceback__)))
        with contextlib.suppress(Exception):
            err.relay_traceback_file = str(folder / "driver.log")  # type: ignore[attr-defined]
        raise
    finally:
        handler.point_to(previous)
        if before is None:
            os.environ.pop(LOG_DIR_ENV, None)
        else:
            os.environ[LOG_DIR_ENV] = before


def use_log_dir(folder: str | Path) -> Path | None:
    """Like `run_logs`, for the rest of the process (e.g. a demo that runs several stages under one folder)."""
    cm = run_logs(folder)
    return cm.__enter__()


# --------------------------------------------------------------------------------------------- actors
def redirect_output(path: str | Path, role: str = "") -> None:
    """Point this process's stdout and stderr file descriptors at `path` (appending): Python, C++ and child
    processes' output all land there."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    os.write(2, f"==== relay: {role or 'process'} pid {os.getpid()} started {stamp} ====\n".encode())


def worker_setup() -> None:
    """Ray's worker-process setup hook (registered by `init_ray`): in quiet mode, send this process's output
    to RELAY_LOG_DIR/<RELAY_LOG_ROLE>.log. Runs before the actor's module is imported; never raises (a
    failing hook would kill the worker)."""
    try:
        folder = log_dir()
        if folder is None:
            return
        role = os.environ.get(ROLE_ENV) or "ray-workers"
        redirect_output(folder / role_file_name(role), role)
        logging.captureWarnings(False)  # warnings go to stderr, i.e. the file
    except Exception as err:  # noqa: BLE001
        with contextlib.suppress(Exception):
            print(f"relay: could not redirect this worker's output ({err})", file=sys.stderr)


# --------------------------------------------------------------------------------------------- vLLM
VLLM_RELOAD_LOGGER = "vllm.model_executor.model_loader.reload.layerwise"
VLLM_RELOAD_MESSAGE = "%s: Failed to load weights"
EXPLANATION = (
    "%s: vLLM's 'Failed to load weights' for this layer on a weight update is expected, not an error: the layer "
    "has no tensors of its own in the update (a rotary-embedding cache, an lm_head tied to the embeddings) and "
    "keeps what it has. Relay verifies each update itself; further such lines are not shown."
)


class ReloadWarningFilter(logging.Filter):
    """Explains vLLM's misleading 'X: Failed to load weights' reload warning once, then drops it, for layers
    that hold no checkpoint weights (rotary embeddings; the lm_head when embeddings are tied). Other layers'
    warnings pass unchanged."""

    def __init__(self, tied_embeddings: bool = False) -> None:
        super().__init__()
        self.tied = tied_embeddings
        self.explained = False
        self.dropped = 0

    def expected(self, layer: str) -> bool:
        return "RotaryEmbedding" in layer or (self.tied and "LMHead" in layer)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg != VLLM_RELOAD_MESSAGE or not record.args:
            return True
        args = record.args if isinstance(record.args, tuple) else (record.args,)
        if not self.expected(str(args[0])):
            return True
        if self.explained:
            self.dropped += 1
            return False
        self.explained = True
        record.msg, record.levelno, record.levelname = EXPLANATION, logging.INFO, "INFO"
        return True


def explain_vllm_reload_warnings(tied_embeddings: bool = False) -> ReloadWarningFilter:
    """Install `ReloadWarningFilter` on vLLM's reload logger in this process (idempotent)."""
    lg = logging.getLogger(VLLM_RELOAD_LOGGER)
    for f in lg.filters:
        if isinstance(f, ReloadWarningFilter):
            f.tied = f.tied or tied_embeddings
            return f
    f = ReloadWarningFilter(tied_embeddings)
    lg.addFilter(f)
    return f


# --------------------------------------------------------------------------------------------- errors
# Exception types whose message says enough on its own; others are shown as "Type: message".
_PLAIN = (ValueError, RuntimeError, FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError,
          TimeoutError, ConnectionError)


def _cause(err: BaseException) -> BaseException:
    """A Ray task error's original exception (`RayTaskError.cause`), if any."""
    for _ in range(4):
        cause = getattr(err, "cause", None)
        if not isinstance(cause, BaseException) or cause is err:
            break
        err = cause
    return err


def _squash(text: str) -> str:
    """One line from a message that may embed a remote traceback: the text before it plus its last line."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)  # Ray colours the "ray::Actor.method()" part of remote errors
    lines = [l.rstrip() for l in text.strip().splitlines() if l.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else ""
    head = lines[0]
    marker = re.search(r"\s*(ray::\S+|Traceback \(most recent call last\))", head)
    if marker:
        head = head[: marker.start()].rstrip()
    tail = lines[-1].strip()
    if any(l.lstrip().startswith(("File \"", "Traceback")) for l in lines[1:]) or marker:
        return f"{head} {tail}".strip() if head and head != tail else tail
    return " ".join(l.strip() for l in lines)


def error_line(err: BaseException) -> str:
    """'<what went wrong>' in one line, for `relay <cmd>: error: ...`."""
    err = _cause(err)
    msg = _squash(str(err)) or type(err).__name__
    module = type(err).__module__ or ""
    if not (isinstance(err, _PLAIN) or module.startswith("relay.")) and not msg.startswith(type(err).__name__):
        msg = f"{type(err).__name__}: {msg}"
    return msg


def report_error(prog: str, err: BaseException, stream=None) -> None:
    """Print `prog: error: <one line> (traceback in SAVE_DIR/logs/driver.log; --verbose prints it)`."""
    kept = getattr(err, "relay_traceback_file", None)
    hint = f"traceback in {kept}; --verbose prints it" if kept else "--verbose shows the traceback"
    print(f"{prog}: error: {error_line(err)} ({hint})", file=stream or sys.stderr, flush=True)
