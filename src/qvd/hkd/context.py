"""What the daemon shares with its VM handlers, and how it runs database calls."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar

from qvd.backends.base import Backend
from qvd.core.config import Config
from qvd.hkd.store import HkdStore
from qvd.hkd.vma_client import VmaClient

P = ParamSpec("P")
T = TypeVar("T")


class DbRunner:
    """Runs blocking store functions in a thread pool reserved for the database.

    A pool of its own: if the database hangs, its calls pile up here and not in the
    default executor, which the backends need to tear desktops down (self-fencing
    must work precisely when the database does not).
    """

    def __init__(self, workers: int = 4) -> None:
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="hkd-db")

    async def __call__(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, functools.partial(fn, *args, **kwargs))

    def close(self) -> None:
        # Threads stuck on a dead database must not keep the process alive at exit.
        self._pool.shutdown(wait=False, cancel_futures=True)


class ContextLog(logging.LoggerAdapter[logging.Logger]):
    """Prefixes every line with its context fields, e.g. ``vm_id=7 host=node1: started``."""

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        fields = " ".join(f"{k}={v}" for k, v in (self.extra or {}).items())
        return f"{fields}: {msg}", kwargs


@dataclass
class HandlerContext:
    """Everything a VM handler uses; owned by the daemon."""

    store: HkdStore
    db: DbRunner
    backend: Backend
    vma: VmaClient
    cfg: Config
    heavy: asyncio.Semaphore
    node: str
