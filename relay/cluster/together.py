"""Start a run's actors side by side: each starter blocks until its actor is ready (a model loaded, a process group
formed), and one after another they left cores idle while the slowest (a vLLM engine) came up."""
from __future__ import annotations

import threading
from typing import Any, Callable


def start_together(starters: dict[str, Callable[[], Any]], keep: Callable[[str, Any], None]) -> None:
    """Run every starter in a thread of its own and wait for all of them. `keep(name, result)` receives each
    result as soon as it is ready (one at a time), so a caller can shut down what did start when another
    starter fails. The first failure (by name order) is raised once every starter has ended; the
    others are attached to it as notes."""
    errors: dict[str, BaseException] = {}
    lock = threading.Lock()

    def run(name: str, starter: Callable[[], Any]) -> None:
        try:
            value = starter()
        except BaseException as err:  # noqa: BLE001 - reported to the caller below
            with lock:
                errors[name] = err
            return
        with lock:
            keep(name, value)

    threads = [threading.Thread(target=run, args=item, name=f"relay-start-{item[0]}", daemon=True)
               for item in starters.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        first, *rest = [name for name in starters if name in errors]
        err = errors[first]
        for name in rest:
            err.add_note(f"also failed while starting {name}: {type(errors[name]).__name__}: {errors[name]}")
        raise err
