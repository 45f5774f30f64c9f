"""The NX session of the desktop: its state machine, actions and timeouts.

One :class:`SessionManager` per VMA.  It owns at most one nxagent.  It never
starts processes itself: a :class:`SessionRuntime` does (the real one is
:class:`qvd.vma.desktop.HostRuntime`, tests use a fake), so the logic below can
be tested without root or NX.

Life of a session (X states in brackets, see :data:`qvd.vma.nx.X_OF_NX`)::

    x_start  --pre_connect hook-->  initiating [starting]
             --worker-->  provisioning [provisioning] --connect hook--> initiating,
                          nxagent spawned --log--> starting [starting]
                          --log "Waiting for connection"--> [listening]
    client attaches        --log--> started [connected]   -> desktop programs start now
    client goes / x_suspend --HUP--> suspending -> suspended [suspended]
    x_start (suspended)    --pre_connect, connect hooks, new options, HUP--> resuming [starting]
                           --log "Waiting for connection"--> [listening]
    client attaches        --log--> resumed [connected]   -> xrefresh nudges a repaint
    x_stop / logout        --TERM--> terminating [stopping] -> terminated [stopped]

Timeouts (checked by :meth:`SessionManager.tick`, which the monitor thread calls
every 0.2 s and every ``x_state`` call runs first):

* a resume signal nxagent does not act on within ``internal.nxagent.timeout.listening``:
  back to suspended (the next ``x_start`` signals it again);
* listening longer than ``internal.nxagent.timeout.listening``: a session that
  was never connected is terminated (nothing is lost: the desktop programs start
  only at the first connection); a *resumed* session goes back to suspended with
  SIGHUP instead of being terminated (the reference terminated it, bug 10.2.12);
* suspending longer than ``internal.nxagent.timeout.suspending``: stop;
* a stop (SIGTERM) not finished after ``internal.nxagent.timeout.stopping``: SIGKILL.

A stop re-sends SIGTERM when the agent reports ``suspended``: nxagent answers
the first SIGTERM of a resuming session by going back to suspended.

Restarting the VMA keeps the session: nxagent runs in its own session with its
output going to a file, ``session.json`` records its pid and start time, and
:meth:`SessionManager.reattach` re-reads the whole log to recover the state.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from qvd.core.config import Config
from qvd.core.errors import BackendError, InvalidState, QvdError
from qvd.vma import options as nxopts
from qvd.vma.hooks import Params, split_params
from qvd.vma.nx import FINAL_NX_STATES, LogFollower, NxState, XState, parse_line, x_state_of
from qvd.vma.procs import ProcHandle
from qvd.vma.provision import Account, UserSpec, user_spec_from_params
from qvd.vma.statedir import StateDir

log = logging.getLogger(__name__)

MSG_CONNECTED = "Can't connect to X session in state connected, suspending it, retry later"

#: delays after which xrefresh runs, counted from the first connection and from each resume
REFRESH_AFTER_START = (0.5, 1.0, 2.0, 4.0)
REFRESH_AFTER_RESUME = (0.3, 1.5)


#: X states that have a state hook (``stopped`` is ``vma.on_state.disconnected``)
HOOKED_STATES = frozenset({XState.CONNECTED, XState.SUSPENDED, XState.STOPPED})


def msg_unable(state: str) -> str:
    return f"Unable to start/resume X session in state {state}, try again in a few minutes"


@dataclass(frozen=True)
class Timeouts:
    listening: float = 30.0
    suspending: float = 20.0
    stopping: float = 20.0

    @classmethod
    def from_config(cls, cfg: Config) -> Timeouts:
        return cls(
            listening=cfg.get_float("internal.nxagent.timeout.listening"),
            suspending=cfg.get_float("internal.nxagent.timeout.suspending"),
            stopping=cfg.get_float("internal.nxagent.timeout.stopping"),
        )


@dataclass(frozen=True)
class SessionRequest:
    """A validated ``x_start`` call."""

    user: UserSpec
    client: nxopts.ClientOptions
    hook_params: Params = ()
    secrets: Mapping[str, str] = field(default_factory=dict)


def parse_request(params: Mapping[str, str], cfg: Config) -> SessionRequest:
    """Validate the ``x_start`` parameters.  Raises :class:`qvd.core.errors.InputError`."""
    client = nxopts.parse_client_options(params)
    user = user_spec_from_params(params, cfg)
    public, secrets = split_params(params)
    return SessionRequest(user=user, client=client, hook_params=public, secrets=secrets)


class SessionRuntime(Protocol):
    """The side effects of a session (processes, accounts, files outside the state dir)."""

    def provision(self, request: SessionRequest) -> Account:
        """Create the user.  Raises QvdError subclasses."""

    def prepare_display(self, display: int) -> None:
        """Make the X socket directory usable and remove stale locks of ``display``."""

    def start_nxagent(self, account: Account, request: SessionRequest, display: int) -> ProcHandle:
        """Start nxagent as the user, output into the state dir's nxagent.log.  Raises QvdError/OSError."""

    def start_desktop(self, account: Account, request: SessionRequest, display: int) -> ProcHandle | None:
        """Start the desktop programs; return the one whose exit ends the session, if any."""

    def refresh(self, account: Account, request: SessionRequest, display: int) -> None:
        """Ask every window to repaint (xrefresh)."""

    def adopt(self, pid: int, start_time: int | None, *, name: str | None) -> ProcHandle | None:
        """The process of a previous VMA, if it still runs."""


class HookRunner(Protocol):
    def run_action(self, action: str, params: Params, state: str, *, secrets: Mapping[str, str] | None = None,
                   extra: Params = ()) -> None: ...

    def fire_state(self, state: str, params: Params, *, secrets: Mapping[str, str] | None = None) -> None: ...


class _Cancelled(Exception):
    """A stop arrived while the session was being set up."""


class SessionManager:
    """The state machine.  Thread-safe: RPC threads, the worker and the monitor share one lock."""

    def __init__(
        self,
        *,
        display: int,
        timeouts: Timeouts,
        runtime: SessionRuntime,
        hooks: HookRunner,
        state_dir: StateDir,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        threaded: bool = True,
    ) -> None:
        self.display = display
        self.timeouts = timeouts
        self._runtime = runtime
        self._hooks = hooks
        self._dir = state_dir
        self._clock = clock
        self._wall = wall
        self._threaded = threaded  # tests run the set-up worker inline
        self._lock = threading.RLock()
        self._nx = NxState.STOPPED
        self._accepting = False  # nxagent said "Waiting for connection" since it began starting/resuming
        self._since = clock()
        self._seq = 0  # counts state changes; "already signalled in this state" compares it
        self._busy = False  # an x_start is running hooks / the worker is setting up
        self._worker: threading.Thread | None = None
        self.last_error: str | None = None
        self._reset_session()

    def _reset_session(self) -> None:
        self._proc: ProcHandle | None = None
        self._desktop: ProcHandle | None = None
        self._desktop_started = False
        self._account: Account | None = None
        self._request: SessionRequest | None = None
        self._connected_once = False
        self._stop_at: float | None = None
        self._stop_reason = ""
        self._term_for: int | None = None  # _seq of the state in which SIGTERM was last sent
        self._killed = False
        self._hup_at: float | None = None  # HUP sent because a resumed session was not attached
        self._follower: LogFollower | None = None
        self._refresh_due: list[float] = []
        self._started_wall: float | None = None

    # ------------------------------------------------------------------ queries

    def _xstate(self) -> XState:
        if self._stop_at is not None and self._nx not in FINAL_NX_STATES:
            return XState.STOPPING
        if self._nx in (NxState.STARTING, NxState.RESUMING) and not self._accepting:
            # nxagent announces "Starting/Resuming session" a moment before its socket listens:
            # saying "listening" then sends the L7R's connection into a closed port.
            return XState.STARTING
        return x_state_of(self._nx)

    def x_state(self) -> XState:
        with self._lock:
            self._tick_locked()
            return self._xstate()

    @property
    def nx_state(self) -> NxState:
        return self._nx

    def hook_context(self) -> tuple[Params, Mapping[str, str]]:
        """Parameters (and secrets) of the current session, for hooks run outside the session's actions."""
        with self._lock:
            if self._request is None:
                return (), {}
            return self._request.hook_params, self._request.secrets

    @property
    def nxagent_pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def info(self) -> dict[str, Any]:
        """Non-secret facts for ``/vma/info`` (never the nxagent log)."""
        with self._lock:
            self._tick_locked()
            return {
                "x_state": str(self._xstate()),
                "nx_state": str(self._nx),
                "state_age": round(self._clock() - self._since, 3),
                "user": self._account.name if self._account else None,
                "display": self.display,
                "nx_port": nxopts.nx_port(self.display),
                "nxagent_pid": self.nxagent_pid,
                "connected_once": self._connected_once,
                "session_started_at": self._started_wall,
                "last_error": self.last_error,
            }

    # ------------------------------------------------------------------ transitions

    def _set_nx(self, new: NxState, *, quiet: bool = False) -> None:
        if new == self._nx:
            return
        old_x = self._xstate()
        old = self._nx
        self._nx = new
        if new in (NxState.STARTING, NxState.RESUMING):
            self._accepting = False
        self._since = self._clock()
        self._seq += 1
        new_x = self._xstate()
        log.info("session state %s -> %s (x %s)", old, new, new_x)
        if new not in FINAL_NX_STATES and self._proc is not None:
            self._save_state()
        if not quiet and new_x != old_x and new_x in HOOKED_STATES and self._request is not None:
            self._hooks.fire_state(str(new_x), self._request.hook_params, secrets=self._request.secrets)

    def _save_state(self) -> None:
        try:
            self._dir.write_state(str(self._nx), self._wall())
        except OSError as e:
            log.warning("cannot write %s: %s", self._dir.state_file, e)

    def _save_session(self) -> None:
        if self._proc is None or self._account is None or self._request is None:
            return
        a, r = self._account, self._request
        data = {
            "version": 1,
            "display": self.display,
            "pid": self._proc.pid,
            "pid_start_time": self._proc.start_time,
            "desktop_pid": self._desktop.pid if self._desktop else None,
            "desktop_start_time": self._desktop.start_time if self._desktop else None,
            "desktop_started": self._desktop_started,
            "connected_once": self._connected_once,
            "started_at": self._started_wall,
            "account": {"name": a.name, "uid": a.uid, "gid": a.gid, "home": str(a.home), "shell": a.shell,
                        "groups": list(a.groups)},
            "user_spec": {"name": r.user.name, "home": str(r.user.home), "shell": r.user.shell},
            "timezone": r.client.timezone,
            "hook_params": [list(p) for p in r.hook_params],
        }
        try:
            self._dir.write_session(data)
            self._dir.write_pid(self._proc.pid)
        except OSError as e:
            log.warning("cannot write session files: %s", e)

    def _apply(self, new: NxState, *, replay: bool = False) -> None:
        """A state reported by nxagent."""
        self._set_nx(new, quiet=replay)
        if new in (NxState.STARTED, NxState.RESUMED):
            self._connected_once = True
            self._hup_at = None
        if replay:
            return
        now = self._clock()
        if new is NxState.STARTED and not self._desktop_started:
            # Only now: X clients drawing before the proxy attaches often leave a black screen (lab notes).
            self._launch_desktop()
            self._refresh_due += [now + d for d in REFRESH_AFTER_START]
        elif new is NxState.RESUMED:
            self._refresh_due += [now + d for d in REFRESH_AFTER_RESUME]
        if new in (NxState.STARTED, NxState.RESUMED):
            self._save_session()

    def _launch_desktop(self) -> None:
        if self._account is None or self._request is None:
            return
        self._desktop_started = True
        try:
            self._desktop = self._runtime.start_desktop(self._account, self._request, self.display)
        except (OSError, QvdError) as e:
            log.error("cannot start the desktop programs: %s", e)

    def _request_stop_locked(self, reason: str) -> None:
        if self._stop_at is None:
            self._stop_at = self._clock()
            self._stop_reason = reason
            log.info("stopping the session: %s", reason)
        if self._proc is not None and self._term_for != self._seq:
            self._term_for = self._seq
            self._proc.send(signal.SIGTERM)

    def _finish(self) -> None:
        """nxagent is gone: forget the session."""
        if self._follower is not None:
            for line in self._follower.read_lines():
                ev = parse_line(line)
                if ev and ev.state:
                    self._set_nx(ev.state)  # state hooks yes, desktop start/refresh no: it is over
            self._follower.close()
        if self._nx not in FINAL_NX_STATES:
            clean = self._stop_at is not None or self._nx is NxState.TERMINATING
            final = NxState.TERMINATED if clean else NxState.ABORTED
            if not clean:
                self.last_error = f"nxagent exited unexpectedly in state {self._nx} (see nxagent.log)"
                log.warning("%s", self.last_error)
            self._proc = None  # the state file must not be rewritten
            self._set_nx(final)
        if self._desktop is not None and self._desktop.alive():
            self._desktop.send_group(signal.SIGTERM)
        self._dir.clear_session()
        log.info("session ended (%s)", self._nx)
        self._reset_session()

    def _fail(self, message: str | None) -> None:
        """Setting up a new session failed (or was cancelled): back to stopped."""
        if message:
            self.last_error = message
            log.error("cannot start the X session: %s", message)
        if self._proc is not None and self._proc.alive():
            self._proc.send(signal.SIGKILL)
        self._proc = None
        self._set_nx(NxState.ABORTED)
        self._dir.clear_session()
        self._reset_session()

    # ------------------------------------------------------------------ monitor

    def tick(self) -> None:
        """Read nxagent's news, notice its death, enforce timeouts, run due refreshes."""
        with self._lock:
            self._tick_locked()

    def _tick_locked(self) -> None:
        if self._follower is not None:
            for line in self._follower.read_lines():
                ev = parse_line(line)
                if ev is None:
                    continue
                if ev.state is not None:
                    self._apply(ev.state)
                elif ev.waiting:
                    self._accepting = True
                elif ev.pid is not None and self._proc is not None and ev.pid != self._proc.pid:
                    log.warning("nxagent reports pid %d, expected %d", ev.pid, self._proc.pid)
        if self._proc is not None and not self._proc.alive():
            self._finish()
            return
        now = self._clock()
        if (self._desktop is not None and not self._desktop.alive() and self._stop_at is None
                and self._nx not in FINAL_NX_STATES):
            self._desktop = None
            self._request_stop_locked("the desktop session ended (user logged out)")
        self._check_timeouts(now)
        if self._refresh_due and self._account is not None and self._request is not None:
            due = [t for t in self._refresh_due if t <= now]
            if due:
                self._refresh_due = [t for t in self._refresh_due if t > now]
                if self._nx in (NxState.STARTED, NxState.RESUMED):
                    try:
                        self._runtime.refresh(self._account, self._request, self.display)
                    except OSError as e:
                        log.info("xrefresh failed: %s", e)

    def _check_timeouts(self, now: float) -> None:
        proc = self._proc
        if proc is None:
            return  # provisioning or before spawn: the worker owns the session
        age = now - self._since
        t = self.timeouts
        if self._stop_at is not None:
            if not self._killed and now - self._stop_at > t.stopping:
                log.warning("nxagent did not stop within %g s, killing it", t.stopping)
                self._killed = True
                proc.send(signal.SIGKILL)
            elif self._nx in (NxState.SUSPENDED, NxState.STARTING, NxState.RESUMING) and self._term_for != self._seq:
                self._term_for = self._seq
                proc.send(signal.SIGTERM)
            return
        if self._nx is NxState.INITIATING and not self._busy and not self._connected_once and age > t.listening:
            self._request_stop_locked("nxagent did not start listening")
        elif self._nx is NxState.INITIATING and not self._busy and age > t.listening:
            # A resume whose SIGHUP nxagent did not act on: the agent is still suspended; say so,
            # so that the next x_start signals it again instead of waiting here for ever.
            log.warning("nxagent did not resume within %g s of the signal; the session stays suspended", t.listening)
            self._set_nx(NxState.SUSPENDED, quiet=True)
        elif self._nx is NxState.STARTING and age > t.listening:
            self._request_stop_locked(f"no client attached to the new session within {t.listening:g} s")
        elif self._nx is NxState.RESUMING:
            if self._hup_at is None and age > t.listening:
                log.info("no client attached to the resumed session within %g s, suspending it again",
                         t.listening)
                self._hup_at = now
                proc.send(signal.SIGHUP)
            elif self._hup_at is not None and now - self._hup_at > t.suspending:
                self._request_stop_locked("the unattached resumed session did not suspend")
        elif self._nx is NxState.SUSPENDING and age > t.suspending:
            self._request_stop_locked(f"suspending took more than {t.suspending:g} s")
        elif self._nx in (NxState.TERMINATING, NxState.ABORTING) and age > t.stopping and not self._killed:
            log.warning("nxagent stuck in %s, killing it", self._nx)
            self._killed = True
            proc.send(signal.SIGKILL)

    # ------------------------------------------------------------------ actions

    def x_start(self, request: SessionRequest) -> str:
        """Start a new session or resume the suspended one.  Returns ``starting``.

        Raises :class:`InvalidState` with the reference messages when the state
        does not allow it (a connected session is suspended first: take-over),
        :class:`qvd.core.errors.BackendError` when a hook refuses.
        """
        with self._lock:
            self._tick_locked()
            xs = self._xstate()
            if self._busy:
                raise InvalidState(msg_unable(str(xs)))
            if xs is XState.CONNECTED and self._proc is not None:
                log.info("x_start while connected: suspending the session for a take-over")
                self._proc.send(signal.SIGHUP)
                raise InvalidState(MSG_CONNECTED)
            if xs is XState.SUSPENDED:
                if self._account is not None and request.user.name != self._account.name:
                    raise InvalidState(f"the X session belongs to user {self._account.name}, "
                                       f"not {request.user.name}")
                resume = True
            elif xs is XState.STOPPED:
                resume = False
                self.last_error = None
            else:
                raise InvalidState(msg_unable(str(xs)))
            previous = self._nx
            old_proc = None
            if not resume and self._proc is not None:
                # nxagent said "terminated" but has not exited yet; the worker waits for it.
                old_proc = self._proc
                if self._desktop is not None:
                    self._desktop.send_group(signal.SIGTERM)
                if self._follower is not None:
                    self._follower.close()
                self._dir.clear_session()
                self._reset_session()
            self._busy = True
            self._set_nx(NxState.INITIATING)
        try:
            self._hooks.run_action("pre_connect", request.hook_params, str(XState.STARTING), secrets=request.secrets)
            if resume:
                return self._resume(request)
        except BaseException:
            with self._lock:
                self._busy = False
                if self._nx is NxState.INITIATING:
                    self._set_nx(previous, quiet=True)
            raise
        if self._threaded:
            self._worker = threading.Thread(target=self._new_session, args=(request, old_proc),
                                            name="vma-session-setup", daemon=True)
            self._worker.start()
        else:
            self._new_session(request, old_proc)
        return str(XState.STARTING)

    def _resume(self, request: SessionRequest) -> str:
        self._hooks.run_action("connect", request.hook_params, str(XState.STARTING), secrets=request.secrets)
        if request.client.timezone and self._request and request.client.timezone != self._request.client.timezone:
            log.info("time zone change ignored on resume: the programs of the session keep theirs")
        self._dir.write_options(nxopts.nx_options_line(request.client, self.display))
        with self._lock:
            self._tick_locked()
            if self._nx is not NxState.INITIATING or self._proc is None or self._stop_at is not None:
                raise InvalidState(msg_unable(str(self._xstate())))
            old = self._request
            # Keep the time zone the session started with: its programs cannot change it.
            client = request.client if old is None else dataclasses.replace(request.client,
                                                                             timezone=old.client.timezone)
            self._request = dataclasses.replace(request, client=client)
            self._hup_at = None
            self._proc.send(signal.SIGHUP)
            self._busy = False
            self._save_session()
        return str(XState.STARTING)

    def _new_session(self, request: SessionRequest, old_proc: ProcHandle | None) -> None:
        try:
            _wait_gone(old_proc)
            with self._lock:
                if self._stop_at is not None:
                    raise _Cancelled
                self._request = request
                self._set_nx(NxState.PROVISIONING)
            account = self._runtime.provision(request)
            with self._lock:
                if self._stop_at is not None:
                    raise _Cancelled
            self._hooks.run_action("connect", request.hook_params, str(XState.PROVISIONING),
                                   secrets=request.secrets)
            with self._lock:
                if self._stop_at is not None:
                    raise _Cancelled
                self._account = account
                self._set_nx(NxState.INITIATING)
                self._dir.write_options(nxopts.nx_options_line(request.client, self.display))
                self._runtime.prepare_display(self.display)
                self._proc = self._runtime.start_nxagent(account, request, self.display)
                self._started_wall = self._wall()
                self._follower = LogFollower(self._dir.nxagent_log)
                self._since = self._clock()
                self._save_state()
                self._save_session()
                log.info("nxagent started for %s (pid %d, display :%d, port %d)", account.name, self._proc.pid,
                         self.display, nxopts.nx_port(self.display))
                self._busy = False
        except _Cancelled:
            with self._lock:
                log.info("session set-up cancelled by a stop request")
                self._fail(None)
        except (QvdError, OSError) as e:
            with self._lock:
                self._fail(getattr(e, "message", None) or str(e))
        finally:
            with self._lock:
                self._busy = False
                self._worker = None

    def x_suspend(self) -> str:
        with self._lock:
            self._tick_locked()
            xs = self._xstate()
            params = self._request.hook_params if self._request else ()
            secrets = self._request.secrets if self._request else {}
            if xs not in (XState.LISTENING, XState.CONNECTED) or self._busy:
                return "ok"
        self._hooks.run_action("suspend", params, str(xs), secrets=secrets)
        with self._lock:
            if self._xstate() in (XState.LISTENING, XState.CONNECTED) and self._proc is not None:
                self._proc.send(signal.SIGHUP)
        return "ok"

    def x_stop(self) -> str:
        with self._lock:
            self._tick_locked()
            xs = self._xstate()
            if xs is XState.STOPPED and not self._busy:
                return "ok"
            params = self._request.hook_params if self._request else ()
            secrets = self._request.secrets if self._request else {}
        self._hooks.run_action("stop", params, str(xs), secrets=secrets)
        with self._lock:
            if self._xstate() is not XState.STOPPED or self._busy:
                self._request_stop_locked("x_stop")
        return "ok"

    def expire(self, soft: str, hard: str) -> str:
        with self._lock:
            xs = self._xstate()
            params = self._request.hook_params if self._request else ()
            secrets = self._request.secrets if self._request else {}
        self._hooks.run_action("expire", params, str(xs), secrets=secrets,
                               extra=(("vm.expiration.soft", soft), ("vm.expiration.hard", hard)))
        return "ok"

    def stop_and_wait(self, *, poll: float = 0.1) -> bool:
        """Stop the session and wait until nxagent is gone (poweroff).  True if it is."""
        t = self.timeouts
        deadline = self._clock() + t.stopping + t.suspending + 5.0
        with self._lock:
            if self._xstate() is not XState.STOPPED or self._busy:
                self._request_stop_locked("power off")
        while self._clock() < deadline:
            with self._lock:
                self._tick_locked()
                if self._proc is None and not self._busy:
                    return True
            time.sleep(poll)
        return False

    # ------------------------------------------------------------------ restart

    def reattach(self) -> bool:
        """At VMA start: take over the session of a previous VMA if its nxagent still runs."""
        with self._lock:
            data = self._dir.read_session()
            pid = self._dir.read_pid()
            if data is None or pid is None:
                self._dir.clear_session()
                return False
            if data.get("display") != self.display:
                log.warning("the previous session used display :%s, this VMA :%d; not re-attaching (nxagent %d "
                            "is left alone)", data.get("display"), self.display, pid)
                self._dir.clear_session()
                return False
            handle = self._runtime.adopt(pid, data.get("pid_start_time"), name="nxagent")
            if handle is None:
                log.info("the nxagent of the previous VMA (pid %d) is gone", pid)
                self._dir.clear_session()
                return False
            try:
                acc = data["account"]
                spec = data["user_spec"]
                account = Account(name=acc["name"], uid=int(acc["uid"]), gid=int(acc["gid"]), home=Path(acc["home"]),
                                  shell=acc["shell"], groups=tuple(int(g) for g in acc["groups"]))
                request = SessionRequest(
                    user=UserSpec(name=spec["name"], home=Path(spec["home"]), shell=spec["shell"]),
                    client=nxopts.ClientOptions(timezone=data.get("timezone")),
                    hook_params=tuple((str(k), str(v)) for k, v in data.get("hook_params", [])),
                )
            except (KeyError, TypeError, ValueError) as e:
                log.error("cannot re-attach: %s is damaged (%s); leaving nxagent %d alone",
                          self._dir.session_file, e, pid)
                return False
            self._proc, self._account, self._request = handle, account, request
            self._started_wall = data.get("started_at")
            self._desktop_started = bool(data.get("desktop_started"))
            self._connected_once = bool(data.get("connected_once"))
            if data.get("desktop_pid"):
                self._desktop = self._runtime.adopt(int(data["desktop_pid"]), data.get("desktop_start_time"),
                                                    name=None)
            self._follower = LogFollower(self._dir.nxagent_log)
            replayed = False
            for line in self._follower.read_lines():
                ev = parse_line(line)
                if ev and ev.state:
                    self._apply(ev.state, replay=True)
                    replayed = True
                elif ev and ev.waiting:
                    self._accepting = True
            saved = self._dir.read_state()
            if not replayed and saved is not None and saved[0] in {s.value for s in NxState}:
                # No log (deleted?): all we know is the last state written and that the pid lives.
                self._set_nx(NxState(saved[0]), quiet=True)
                self._accepting = True
            if saved is not None and saved[0] == str(self._nx):
                self._since = self._clock() - max(0.0, self._wall() - saved[1])
            log.info("re-attached to nxagent pid %d of user %s in state %s", pid, account.name, self._nx)
            if self._nx in (NxState.STARTED, NxState.RESUMED) and not self._desktop_started:
                self._launch_desktop()
            self._save_state()
            self._save_session()
            return True


def _wait_gone(proc: ProcHandle | None, *, grace: float = 3.0) -> None:
    """A terminated nxagent may still be exiting; the display must be free before the next one."""
    if proc is None:
        return
    deadline = time.monotonic() + grace
    killed = False
    while proc.alive():
        if time.monotonic() > deadline:
            if killed:
                raise BackendError(f"the previous nxagent (pid {proc.pid}) does not exit")
            log.warning("previous nxagent %d still alive after %g s, killing it", proc.pid, grace)
            proc.send(signal.SIGKILL)
            killed = True
            deadline = time.monotonic() + grace
        time.sleep(0.05)
