"""One desktop's life on this node, as resumable steps recorded in ``vm_runtimes.vm_step``.

::

    starting: db -> prepare -> heavy -> launch -> wait_vma ──alive──> running: monitor
              │ refused (no DI, DI blocked)            │ dead + internal.vm.debug.enable -> debugging: monitor
              └──> stopped (last_error + audit)        └ dead/exited/backend error/stop -> stopping
    running:  monitor ── stop command, hard expiry ──> stopping: poweroff -> stop -> cleanup -> stopped
              │ agent dead (max_count AND max_time)  ──> stopping: stop -> cleanup (forced)
              └ processes exited                     ──> stopping: stop -> cleanup
    stopping: any failure ──> zombie: reap (retried every internal.hkd.zombie.retry.delay) -> stopped

Rules that keep the database and the node consistent:

* every state and step write is a compare-and-swap on (VM, this node, expected state);
  when it matches nothing the row is no longer ours (a peer declared the node lost, or
  reset it): the handler then removes the local desktop and writes nothing;
* the "heavy" semaphore (``internal.hkd.max_heavy``) is held from ``heavy`` until the
  agent first answers, and during stop/cleanup/reap: it bounds how many desktops boot
  or tear down at once;
* a failed start always ends ``stopped`` with ``last_error`` and an audit row
  (action ``vm.start``, status ``start-failed``) written by ``hkd:<node>``;
* a stop request during a start is taken at the next step boundary (backend calls are
  not interrupted half-way: their cleanup would be harder than waiting).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from qvd.backends.base import DesktopSpec, Endpoint
from qvd.core.config import Config
from qvd.core.errors import BackendError, InvalidState, QvdError, Unavailable
from qvd.core.states import VmState
from qvd.hkd.context import ContextLog, HandlerContext
from qvd.hkd.store import VmRecord

log = logging.getLogger(__name__)

# While starting, the first pings come fast: a container's agent usually listens within
# a second, and every second saved here is a second less in front of the user.
_FIRST_START_POLL = 0.1
_SHUTDOWN_POLL = 0.25
_DB_RETRY_MAX = 5.0


def _describe(e: BaseException) -> str:
    if isinstance(e, QvdError):
        return e.message
    if isinstance(e, TimeoutError) and not str(e):
        return "timed out"
    return f"{type(e).__name__}: {e}"


class _StopRequested(Exception):
    """A stop arrived during a start; taken at a step boundary."""


class _RowLost(Exception):
    """The database row is no longer this node's desktop in the state we believed."""


class VmHandler:
    """Drives one desktop.  Create it, then run exactly one of :meth:`start`,
    :meth:`adopt` or :meth:`reap` as an asyncio task (see :meth:`spawn`)."""

    def __init__(self, ctx: HandlerContext, vm_id: int) -> None:
        self.ctx = ctx
        self.vm_id = vm_id
        self.cfg: Config = ctx.cfg
        self.log = ContextLog(log, {"vm_id": vm_id, "host": ctx.node})
        self.state = VmState.STARTING
        self.step = ""
        self.spec: DesktopSpec | None = None
        self.stop_reason = ""
        self.graceful = True
        self.task: asyncio.Task[None] | None = None
        self.settled = asyncio.Event()  # reached running/debugging, stopped, or its first reap attempt
        self._stop = asyncio.Event()
        self._poke = asyncio.Event()  # wakes a zombie for an immediate retry
        self._heavy = False
        self._t0 = time.monotonic()

    # --- control from the daemon -----------------------------------------------------------

    def spawn(self, body: Awaitable[None]) -> asyncio.Task[None]:
        self.task = asyncio.create_task(self._guard(body), name=f"vm-{self.vm_id}")
        return self.task

    def request_stop(self, reason: str, *, graceful: bool = True) -> None:
        """Ask for a stop (idempotent; a forced request upgrades a graceful one)."""
        if not self._stop.is_set():
            self.stop_reason, self.graceful = reason, graceful
            self._stop.set()
            self.log.info("stop requested: %s%s", reason, "" if graceful else " (forced)")
        elif not graceful and self.graceful:
            self.graceful = False
            self.log.info("stop upgraded to forced: %s", reason)
        self._poke.set()

    @property
    def done(self) -> bool:
        return self.task is not None and self.task.done()

    # --- entry points ------------------------------------------------------------------------

    async def start(self, previous: asyncio.Task[None] | None = None) -> None:
        """Run a claimed start command (the row is ``starting``/``db``)."""
        if previous is not None and not previous.done():
            # The previous handler of this VM wrote 'stopped' and is finishing; let it go first.
            await asyncio.wait({previous})
        self.state, self.step = VmState.STARTING, "db"
        try:
            got = await self._db(self.ctx.store.begin_start, self.vm_id)
        except QvdError as e:
            reason = f"cannot start: {e.message}"
            self.log.warning("%s", reason)
            if not await self._db(self.ctx.store.to_stopped, self.vm_id, VmState.STARTING, error=reason,
                                  failed_start=True):
                self.log.warning("the row changed meanwhile; left as it is")
            self.state = VmState.STOPPED
            return
        if got is None:
            raise _RowLost("no longer starting on this node")
        self.spec, self.cfg = got
        spec = self.spec
        self.log.info("starting %s (DI %d) at %s", spec.name, spec.di_id, spec.address)
        try:
            await self._set_step("prepare")
            self._check_stop()
            await self.ctx.backend.prepare(spec)
            await self._set_step("heavy")
            await self._acquire_heavy(interruptible=True)
            await self._set_step("launch")
            self._check_stop()
            await self.ctx.backend.start(spec)
            await self._set_step("wait_vma")
            outcome = await self._wait_vma()
        except (BackendError, OSError) as e:
            await self._stop_desktop(graceful=False, error=f"start failed at step '{self.step}': {_describe(e)}",
                                     failed_start=True)
            return
        except _StopRequested:
            self.log.info("start interrupted at step '%s': %s", self.step, self.stop_reason)
            await self._stop_desktop(graceful=False)
            return
        if outcome == "alive":
            if not await self._db(self.ctx.store.to_running, self.vm_id, VmState.STARTING):
                raise _RowLost("no longer starting on this node")
            self.state, self.step = VmState.RUNNING, "monitor"
            self._release_heavy()
            self.settled.set()
            self.log.info("running (%.2f s after the start was claimed)", time.monotonic() - self._t0)
            await self._monitor()
        elif outcome == "dead":
            limit = self.cfg.get_float("internal.hkd.vmhandler.vma.failed.max_time.on.starting")
            error = f"the desktop's agent did not answer within {limit:g} s of starting"
            if self.cfg.get_bool("internal.vm.debug.enable"):
                await self._to_debugging(error)
                await self._monitor()
            else:
                await self._stop_desktop(graceful=False, error=error, failed_start=True)
        elif outcome == "exited":
            await self._stop_desktop(graceful=False, error="the desktop exited while starting (see its console "
                                     "log on the node)", failed_start=True)
        else:
            self.log.info("start interrupted while waiting for the agent: %s", self.stop_reason)
            await self._stop_desktop(graceful=False)

    async def adopt(self, spec: DesktopSpec) -> None:
        """Take over a desktop a previous run of the daemon left running and healthy."""
        self.spec, self.state = spec, VmState.RUNNING
        await self._set_step("monitor")
        self.settled.set()
        self.log.info("adopted the running desktop at %s", spec.address)
        await self._monitor()

    async def reap(self, record: VmRecord, reason: str) -> None:
        """Stop and clean what a previous run left (state from the database), then ``stopped``."""
        self.state, self.step = record.state, record.step
        self.log.warning("reaping (was %s/%s): %s", record.state.value, record.step or "-", reason)
        if record.state == VmState.ZOMBIE:
            await self._zombie(first_delay=0.0)
        elif record.state == VmState.STOPPING:
            await self._set_step("stop", error=reason)
            await self._stop_desktop(graceful=False)
        else:
            await self._stop_desktop(graceful=False, error=reason, failed_start=record.state == VmState.STARTING)

    async def expire(self, soft: str, hard: str) -> None:
        """Tell the agent its desktop is soft-expired (it notifies the user through its hook)."""
        if self.spec is None or self.state != VmState.RUNNING:
            return
        try:
            await self.ctx.vma.call(self._vma_endpoint(), "expire",
                                    {"vm.expiration.soft": soft, "vm.expiration.hard": hard},
                                    timeout=self.cfg.get_float("internal.hkd.agent.rpc.timeout"))
            self.log.info("soft expiration notified to the agent")
        except (Unavailable, InvalidState) as e:
            self.log.warning("soft expiration not delivered: %s", e.message)

    # --- the steps -----------------------------------------------------------------------------

    async def _guard(self, body: Awaitable[None]) -> None:
        try:
            await body
        except _RowLost as e:
            self.log.warning("%s: removing the local desktop, leaving the database alone", e)
            await self._local_teardown()
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug must not leave a desktop unaccounted for
            self.log.exception("unexpected error in step '%s'", self.step)
            await self._after_crash()
        finally:
            self._release_heavy()
            self.settled.set()

    async def _after_crash(self) -> None:
        if self.state in (VmState.STOPPED, VmState.ZOMBIE):
            return
        try:
            ok = await self._db_once(self.ctx.store.to_zombie, self.vm_id, self.state,
                                     f"internal error of the node daemon at step '{self.step}'")
        except Exception:  # the database may be the problem; the next daemon start reaps it
            self.log.exception("cannot record the zombie state")
            return
        if ok:
            self.state = VmState.ZOMBIE
            with contextlib.suppress(Exception):  # best effort: the error was already logged above
                await self._zombie(first_delay=0.0)

    async def _wait_vma(self) -> str:
        """'alive', 'dead' (no answer within max_time), 'exited' (processes gone) or 'stop'."""
        limit = self.cfg.get_float("internal.hkd.vmhandler.vma.failed.max_time.on.starting")
        slow = self.cfg.get_float("internal.hkd.vmhandler.vma_monitor.delay.after.error")
        t0 = time.monotonic()
        delay = min(_FIRST_START_POLL, slow)
        while True:
            if self._stop.is_set():
                return "stop"
            if not await self.ctx.backend.is_running(self.vm_id):
                return "exited"
            if await self._ping():
                return "alive"
            if time.monotonic() - t0 > limit:
                return "dead"
            await self._wait_stop(delay)
            delay = min(delay * 1.5, slow)

    async def _monitor(self) -> None:
        ok_delay = self.cfg.get_float("internal.hkd.vmhandler.vma_monitor.delay.after.ok")
        err_delay = self.cfg.get_float("internal.hkd.vmhandler.vma_monitor.delay.after.error")
        max_count = self.cfg.get_int("internal.hkd.vmhandler.vma.failed.max_count.on.running")
        max_time = self.cfg.get_float("internal.hkd.vmhandler.vma.failed.max_time.on.running")
        fails, last_ok, delay = 0, time.monotonic(), ok_delay
        while True:
            if await self._wait_stop(delay):
                await self._stop_desktop(graceful=self.graceful)
                return
            if not await self.ctx.backend.is_running(self.vm_id):
                await self._stop_desktop(graceful=False, error="the desktop stopped by itself (its processes exited)")
                return
            if await self._ping():
                fails, last_ok, delay = 0, time.monotonic(), ok_delay
                if self.state == VmState.DEBUGGING:
                    if not await self._db(self.ctx.store.to_running, self.vm_id, VmState.DEBUGGING):
                        raise _RowLost("no longer debugging on this node")
                    self.state = VmState.RUNNING
                    self.log.info("the agent answers again: running")
                elif not await self._db(self.ctx.store.vma_ok, self.vm_id, self.state):
                    raise _RowLost(f"no longer {self.state.value} on this node")
                continue
            fails, delay = fails + 1, err_delay
            silent = time.monotonic() - last_ok
            self.log.info("agent did not answer (%d in a row, %.0f s)", fails, silent)
            if self.state == VmState.DEBUGGING:
                if not await self._db(self.ctx.store.still_mine, self.vm_id, VmState.DEBUGGING):
                    raise _RowLost("no longer debugging on this node")
            elif fails >= max_count and silent > max_time:
                error = f"the desktop's agent stopped answering ({fails} failed pings over {silent:.0f} s)"
                if self.cfg.get_bool("internal.vm.debug.enable"):
                    await self._to_debugging(error)
                else:
                    await self._stop_desktop(graceful=False, error=error)
                    return

    async def _to_debugging(self, error: str) -> None:
        if not await self._db(self.ctx.store.to_debugging, self.vm_id, self.state, error):
            raise _RowLost(f"no longer {self.state.value} on this node")
        self.state, self.step = VmState.DEBUGGING, "monitor"
        self._release_heavy()
        self.settled.set()
        self.log.warning("%s: kept in 'debugging' (internal.vm.debug.enable)", error)

    async def _stop_desktop(self, *, graceful: bool, error: str | None = None, failed_start: bool = False) -> None:
        """-> stopping -> (poweroff) -> stop -> cleanup -> stopped; a failure -> zombie."""
        if error:
            self.log.warning("stopping: %s", error)
        if self.state != VmState.STOPPING:
            step = "poweroff" if graceful else "stop"
            if not await self._db(self.ctx.store.to_stopping, self.vm_id, self.state, step, error=error,
                                  failed_start=failed_start):
                raise _RowLost(f"no longer {self.state.value} on this node")
            self.state, self.step = VmState.STOPPING, step
        await self._acquire_heavy(interruptible=False)
        try:
            if graceful and self.spec is not None and await self.ctx.backend.is_running(self.vm_id):
                await self._poweroff()
            await self._set_step("stop")
            async with asyncio.timeout(self.cfg.get_float("internal.hkd.lxc.timeout.on_state.stop")):
                await self.ctx.backend.stop(self.vm_id)
            await self._set_step("cleanup")
            await self.ctx.backend.cleanup(self.vm_id)
        except (BackendError, OSError, TimeoutError) as e:
            self._release_heavy()
            why = f"stopping failed at step '{self.step}': {_describe(e)}"
            self.log.error("%s", why)
            if not await self._db(self.ctx.store.to_zombie, self.vm_id, VmState.STOPPING, why):
                raise _RowLost("no longer stopping on this node") from None
            self.state = VmState.ZOMBIE
            self.settled.set()
            await self._zombie(first_delay=None)
            return
        self._release_heavy()
        if not await self._db(self.ctx.store.to_stopped, self.vm_id, VmState.STOPPING):
            self.log.warning("stopped, but the row changed meanwhile; left as it is")
        self.state, self.step = VmState.STOPPED, ""
        self.log.info("stopped")

    async def _poweroff(self) -> None:
        """Ask the agent to power off and wait for the processes to exit (bounded)."""
        limit = self.cfg.get_float("internal.hkd.lxc.timeout.on_state.shutdown")
        try:
            await self.ctx.vma.call(self._vma_endpoint(), "poweroff",
                                    timeout=self.cfg.get_float("internal.hkd.agent.rpc.timeout"))
        except (Unavailable, InvalidState) as e:
            self.log.info("graceful poweroff refused or impossible (%s); forcing", e.message)
            return
        t0 = time.monotonic()
        while time.monotonic() - t0 < limit:
            if not await self.ctx.backend.is_running(self.vm_id):
                self.log.info("powered off by its agent in %.1f s", time.monotonic() - t0)
                return
            await asyncio.sleep(_SHUTDOWN_POLL)
        self.log.info("still running %g s after poweroff; forcing", limit)

    async def _zombie(self, first_delay: float | None) -> None:
        """Retry stop + cleanup until they succeed, then ``stopped``."""
        delay = self.cfg.get_float("internal.hkd.zombie.retry.delay")
        wait = delay if first_delay is None else first_delay
        while True:
            if wait > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self._poke.wait()
            self._poke.clear()
            wait = delay
            await self._acquire_heavy(interruptible=False)
            try:
                async with asyncio.timeout(self.cfg.get_float("internal.hkd.lxc.timeout.on_state.stop")):
                    await self.ctx.backend.stop(self.vm_id)
                await self.ctx.backend.cleanup(self.vm_id)
            except (BackendError, OSError, TimeoutError) as e:
                self.log.error("reaping failed, retrying in %g s: %s", delay, _describe(e))
                continue
            finally:
                self._release_heavy()
                self.settled.set()
            break
        if not await self._db(self.ctx.store.to_stopped, self.vm_id, VmState.ZOMBIE):
            self.log.warning("reaped, but the row changed meanwhile; left as it is")
        self.state, self.step = VmState.STOPPED, ""
        self.log.info("reaped and stopped")

    async def _local_teardown(self) -> None:
        """Remove the desktop from this node without any database write (fencing, lost rows)."""
        await self._acquire_heavy(interruptible=False)
        try:
            await self.ctx.backend.stop(self.vm_id)
            await self.ctx.backend.cleanup(self.vm_id)
            self.log.info("local desktop removed")
        except (BackendError, OSError) as e:
            self.log.error("cannot remove the local desktop: %s", _describe(e))
        finally:
            self._release_heavy()

    # --- helpers -------------------------------------------------------------------------------

    def _vma_endpoint(self) -> Endpoint:
        if self.spec is None:
            raise InvalidState(f"VM {self.vm_id} has no desktop spec")
        return self.ctx.backend.endpoint_vma(self.spec)

    async def _ping(self) -> bool:
        try:
            await self.ctx.vma.call(self._vma_endpoint(), "ping",
                                    timeout=self.cfg.get_float("internal.hkd.agent.rpc.timeout"))
        except Unavailable:
            return False
        except InvalidState:
            return True  # it answered, if only with an error: the agent is alive
        return True

    async def _wait_stop(self, timeout: float) -> bool:
        """Sleep up to ``timeout``; True at once if a stop is (or gets) requested."""
        # asyncio.timeout, not wait_for: wait_for of Python 3.11 can swallow a cancellation
        # that lands as the inner wait completes, and fencing relies on cancelling handlers.
        try:
            async with asyncio.timeout(timeout):
                await self._stop.wait()
        except TimeoutError:
            return False
        return True

    def _check_stop(self) -> None:
        if self._stop.is_set():
            raise _StopRequested

    async def _set_step(self, step: str, *, error: str | None = None) -> None:
        self.step = step
        if not await self._db(self.ctx.store.set_step, self.vm_id, self.state, step, error=error):
            raise _RowLost(f"no longer {self.state.value} on this node")

    async def _acquire_heavy(self, *, interruptible: bool) -> None:
        if self._heavy:
            return
        if not interruptible:
            await self.ctx.heavy.acquire()
            self._heavy = True
            return
        acquire = asyncio.ensure_future(self.ctx.heavy.acquire())
        stopped = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait({acquire, stopped}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            # Cancelled while queueing: never leak a permit that was granted meanwhile.
            stopped.cancel()
            if not acquire.cancel() and not acquire.cancelled():
                self.ctx.heavy.release()
            raise
        stopped.cancel()
        if acquire.done():
            self._heavy = True
            self._check_stop()
            return
        acquire.cancel()  # Semaphore.acquire hands a permit granted at this instant to the next waiter
        raise _StopRequested

    def _release_heavy(self) -> None:
        if self._heavy:
            self._heavy = False
            self.ctx.heavy.release()

    async def _db(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """A store call, retried while the database is unreachable (fencing cancels us if it lasts)."""
        pause = 0.5
        while True:
            try:
                return await self.ctx.db(fn, *args, **kwargs)
            except SQLAlchemyError as e:
                self.log.warning("database error in %s, retrying in %.1f s: %s", fn.__name__, pause,
                                 str(e).splitlines()[0] if str(e) else type(e).__name__)
                await asyncio.sleep(pause)
                pause = min(pause * 2, _DB_RETRY_MAX)

    async def _db_once(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return await self.ctx.db(fn, *args, **kwargs)
