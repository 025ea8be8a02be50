"""A Ray actor that hosts one worker object, built from its class path.

The coordinator process creates the actors but must never import torch, and the worker classes
(``prefill.worker.PrefillWorker`` ...) do. So the actor class Ray ships is this torch-free host;
the worker's module is imported inside the actor process only. Methods are reached through
``call(method, *args)``; the host is threaded (``max_concurrency``), like the workers expect.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

from core.long_lived import freeze_long_lived


class WorkerHost:
    def __init__(self, class_path: str, spec: dict) -> None:
        threads = spec.get("engine", {}).get("num_threads")
        if threads:
            # before torch loads: OpenMP sizes its pool from this at import time
            os.environ["OMP_NUM_THREADS"] = str(threads)
        module_name, class_name = class_path.split(":")
        cls = getattr(importlib.import_module(module_name), class_name)
        self.worker = cls(spec)
        # this process hosts this one worker for its whole life (core/long_lived.py)
        frozen = freeze_long_lived()
        # Operators (and the e2e tests) map worker names to processes from this line.
        print(f"tandem worker {spec.get('name')} ready in pid {os.getpid()} "
              f"(incarnation {spec.get('incarnation', 0)}; {frozen.objects} objects frozen "
              f"in {frozen.seconds * 1e3:.0f} ms)", flush=True)  # fmt: skip

    def call(self, method: str, *args: Any) -> Any:
        return getattr(self.worker, method)(*args)

    def pid(self) -> int:
        return os.getpid()
