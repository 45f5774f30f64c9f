"""``qvd-vma``: the agent inside every desktop.

Runs with the desktop image's own python3 and the standard library only
(``qvd.core.config`` and ``qvd.core.errors`` are stdlib-only too)::

    PYTHONPATH=/usr/lib/qvd/python python3 -m qvd.vma [--config /etc/qvd/vma.toml]

Normally it is the container's main process (ideally under ``tini``).  It
reaps its children, keeps a live session across its own restart, and on
``poweroff`` stops the session and exits 0 so the container stops.

Signals: SIGTERM/SIGINT end the VMA but leave a running session alone (a new
VMA re-attaches to it); SIGPWR (what ``lxc-stop`` sends to init) is a
graceful power-off: the session is stopped first.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType

import qvd
from qvd.core.config import Config, load_node_file
from qvd.core.errors import ConfigError, QvdError
from qvd.vma import procs
from qvd.vma.desktop import HostRuntime
from qvd.vma.hooks import Hooks
from qvd.vma.rpc import Method, RpcServer
from qvd.vma.session import SessionManager, Timeouts, parse_request
from qvd.vma.statedir import StateDir

log = logging.getLogger(__name__)

DEFAULT_CONFIG = Path("/etc/qvd/vma.toml")
DEFAULT_STATE_DIR = Path("/run/qvd")
MONITOR_PERIOD = 0.2


class Agent:
    """The RPC methods over one :class:`SessionManager`, plus the agent's own life cycle."""

    def __init__(self, cfg: Config, manager: SessionManager, hooks: Hooks, *,
                 on_exit: Callable[[int], None]) -> None:
        self._cfg = cfg
        self.manager = manager
        self._hooks = hooks
        self._on_exit = on_exit
        self._started = time.monotonic()
        self._powering_off = False
        self._lock = threading.Lock()

    def methods(self) -> dict[str, Method]:
        return {
            "ping": lambda p: "pong",
            "x_state": lambda p: str(self.manager.x_state()),
            "x_start": self.x_start,
            "x_suspend": lambda p: self.manager.x_suspend(),
            "x_stop": lambda p: self.manager.x_stop(),
            "poweroff": self.poweroff,
            "expire": self.expire,
            "info": self.info,
        }

    def x_start(self, params: dict[str, str]) -> object:
        if self._powering_off:
            raise QvdError("the desktop is powering off")
        return self.manager.x_start(parse_request(params, self._cfg))

    def expire(self, params: dict[str, str]) -> object:
        return self.manager.expire(params.get("vm.expiration.soft", ""), params.get("vm.expiration.hard", ""))

    def info(self, params: dict[str, str]) -> object:
        return {
            "version": qvd.__version__,
            "uptime": round(time.monotonic() - self._started, 1),
            "powering_off": self._powering_off,
            **self.manager.info(),
        }

    def poweroff(self, params: dict[str, str]) -> object:
        """Run the poweroff hook (it may refuse), answer, then stop the session and exit 0 in the background."""
        with self._lock:
            if self._powering_off:
                return "ok"
            hook_params, secrets = self.manager.hook_context()
            self._hooks.run_action("poweroff", hook_params, str(self.manager.x_state()), secrets=secrets)
            self._powering_off = True
        threading.Thread(target=self.shutdown, args=(0,), name="vma-poweroff", daemon=True).start()
        return "ok"

    def shutdown(self, code: int, *, delay: float = 0.3) -> None:
        self._powering_off = True
        time.sleep(delay)  # let the RPC answer leave before the server goes away
        if not self.manager.stop_and_wait():
            log.warning("the session did not stop in time")
        log.info("powering off")
        self._on_exit(code)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qvd-vma", description="QVD agent inside a desktop: controls the NX session "
                                "(HTTP API on port 3030 by default).")
    p.add_argument("--version", action="version", version=f"qvd-vma {qvd.__version__}")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG,
                   help=f"TOML file with vma.* / internal.* keys (default {DEFAULT_CONFIG}; missing = defaults)")
    p.add_argument("--address", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    p.add_argument("--port", type=int, default=None, help="port to listen on (default internal.vm.port.vma = 3030)")
    p.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR,
                   help=f"where session state and logs live (default {DEFAULT_STATE_DIR})")
    p.add_argument("--log-file", type=Path, default=None, help="log here instead of stderr")
    return p


def _setup_logging(level: str, path: Path | None) -> None:
    handler: logging.Handler = logging.FileHandler(path) if path else logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = Config().overlay(load_node_file(args.config), source=str(args.config))
    except ConfigError as e:
        print(f"qvd-vma: {e.message}", file=sys.stderr)
        return 2
    try:
        _setup_logging(cfg.get_str("log.level"), args.log_file)
    except OSError as e:
        print(f"qvd-vma: cannot open log file: {e}", file=sys.stderr)
        return 2
    port = args.port if args.port is not None else cfg.get_int("internal.vm.port.vma")

    state_dir = StateDir(args.state_dir)
    try:
        state_dir.ensure()
    except OSError as e:
        log.error("cannot use state directory %s: %s", args.state_dir, e)
        return 1
    hooks = Hooks(cfg, state_dir.hooks_log)
    manager = SessionManager(display=cfg.get_int("internal.nxagent.display"), timeouts=Timeouts.from_config(cfg),
                             runtime=HostRuntime(cfg, hooks, state_dir), hooks=hooks, state_dir=state_dir)

    done = threading.Event()
    exit_code = [0]

    def finish(code: int) -> None:
        exit_code[0] = code
        done.set()

    agent = Agent(cfg, manager, hooks, on_exit=finish)
    manager.reattach()
    try:
        server = RpcServer(args.address, port, agent.methods())
    except OSError as e:
        log.error("cannot listen on %s:%d: %s", args.address, port, e)
        return 1

    def on_term(signum: int, frame: FrameType | None) -> None:
        log.info("signal %d: exiting, the session (if any) keeps running", signum)
        finish(0)

    def on_power(signum: int, frame: FrameType | None) -> None:
        log.info("signal %d: powering off", signum)
        threading.Thread(target=agent.shutdown, args=(0,), kwargs={"delay": 0.0}, daemon=True).start()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    signal.signal(signal.SIGPWR, on_power)

    server.start()
    log.info("qvd-vma %s listening on %s:%d, display :%d, state in %s", qvd.__version__, args.address,
             server.port, manager.display, args.state_dir)

    def monitor() -> None:
        while not done.is_set():
            try:
                manager.tick()
                procs.reap()
            except Exception:  # the monitor must survive anything to keep enforcing timeouts
                log.exception("session monitor error")
            done.wait(MONITOR_PERIOD)

    threading.Thread(target=monitor, name="vma-monitor", daemon=True).start()
    while not done.wait(1.0):
        pass
    server.stop()
    log.info("qvd-vma stopped (exit code %d)", exit_code[0])
    return exit_code[0]


if __name__ == "__main__":
    sys.exit(main())
