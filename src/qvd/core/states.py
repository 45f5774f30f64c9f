"""State machines of VMs, user connections and hosts, in one place.

Each machine is an Enum plus an explicit transition table.  Writers never set a
state directly: they call :func:`check_vm_transition` (or the user/host twins)
and then write it with a compare-and-swap against the state they read
(``qvd.db.queries``), so a concurrent writer makes the update match zero rows
instead of being overwritten.

Commands (``vm_cmd``, ``user_cmd``, ``host_cmd``) are requests for the owner of
the row; :data:`VM_CMD_ALLOWED_FROM` says in which states each may be written.

Shown status (e.g. "running but host lost") is derived from desired + observed
state + host health when read; it is never stored.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import TypeVar

from qvd.core.errors import IllegalTransition, InvalidState

S = TypeVar("S", bound=enum.StrEnum)


class VmState(enum.StrEnum):
    STOPPED = "stopped"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    ZOMBIE = "zombie"  # something went wrong while stopping: being reaped
    DEBUGGING = "debugging"  # agent dead but kept for inspection (internal.vm.debug.enable)


class VmCmd(enum.StrEnum):
    START = "start"
    STOP = "stop"


class UserState(enum.StrEnum):
    DISCONNECTED = "disconnected"
    CONNECTING = "connecting"
    CONNECTED = "connected"


class UserCmd(enum.StrEnum):
    ABORT = "abort"


class HostState(enum.StrEnum):
    STOPPED = "stopped"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    LOST = "lost"  # declared by a peer whose heartbeat check failed


class HostCmd(enum.StrEnum):
    STOP = "stop"


# --- VM --------------------------------------------------------------------------------------
# stopped -> starting -> running -> stopping -> stopped, with zombie (reaping after a failed
# stop) and debugging.  "-> stopped" from starting covers a start that failed before anything
# ran; from running/debugging/starting it is the reset of a VM whose host was declared lost.
VM_TRANSITIONS: Mapping[VmState, frozenset[VmState]] = {
    VmState.STOPPED: frozenset({VmState.STARTING}),
    VmState.STARTING: frozenset(
        {VmState.RUNNING, VmState.STOPPING, VmState.ZOMBIE, VmState.DEBUGGING, VmState.STOPPED}
    ),
    VmState.RUNNING: frozenset({VmState.STOPPING, VmState.ZOMBIE, VmState.DEBUGGING, VmState.STOPPED}),
    VmState.STOPPING: frozenset({VmState.STOPPED, VmState.ZOMBIE}),
    VmState.ZOMBIE: frozenset({VmState.STOPPED}),
    VmState.DEBUGGING: frozenset({VmState.RUNNING, VmState.STOPPING, VmState.ZOMBIE, VmState.STOPPED}),
}

VM_CMD_ALLOWED_FROM: Mapping[VmCmd, frozenset[VmState]] = {
    VmCmd.START: frozenset({VmState.STOPPED}),
    VmCmd.STOP: frozenset({VmState.STARTING, VmState.RUNNING, VmState.DEBUGGING}),
}

# --- user connection (per VM) ------------------------------------------------------------------
USER_TRANSITIONS: Mapping[UserState, frozenset[UserState]] = {
    UserState.DISCONNECTED: frozenset({UserState.CONNECTING}),
    UserState.CONNECTING: frozenset({UserState.CONNECTED, UserState.DISCONNECTED}),
    UserState.CONNECTED: frozenset({UserState.DISCONNECTED}),
}

USER_CMD_ALLOWED_FROM: Mapping[UserCmd, frozenset[UserState]] = {
    UserCmd.ABORT: frozenset({UserState.CONNECTING, UserState.CONNECTED}),
}

# --- host ------------------------------------------------------------------------------------
# running/stopping -> starting is a node daemon restarting after a crash (it then reaps what
# the previous run left); lost -> starting is a lost node coming back (it stops what it still
# runs before rejoining).
HOST_TRANSITIONS: Mapping[HostState, frozenset[HostState]] = {
    HostState.STOPPED: frozenset({HostState.STARTING}),
    HostState.STARTING: frozenset({HostState.RUNNING, HostState.STOPPING, HostState.STOPPED, HostState.LOST}),
    HostState.RUNNING: frozenset({HostState.STOPPING, HostState.LOST, HostState.STARTING}),
    HostState.STOPPING: frozenset({HostState.STOPPED, HostState.LOST, HostState.STARTING}),
    HostState.LOST: frozenset({HostState.STARTING}),
}

HOST_CMD_ALLOWED_FROM: Mapping[HostCmd, frozenset[HostState]] = {
    HostCmd.STOP: frozenset({HostState.STARTING, HostState.RUNNING}),
}


def _check(kind: str, table: Mapping[S, frozenset[S]], old: S, new: S) -> None:
    if new not in table[old]:
        allowed = ", ".join(sorted(s.value for s in table[old])) or "none"
        raise IllegalTransition(f"{kind} state cannot go from '{old.value}' to '{new.value}' (allowed: {allowed})")


def check_vm_transition(old: VmState, new: VmState) -> None:
    """Raise :class:`IllegalTransition` unless ``old -> new`` is in :data:`VM_TRANSITIONS`."""
    _check("VM", VM_TRANSITIONS, old, new)


def check_user_transition(old: UserState, new: UserState) -> None:
    _check("user", USER_TRANSITIONS, old, new)


def check_host_transition(old: HostState, new: HostState) -> None:
    _check("host", HOST_TRANSITIONS, old, new)


def check_vm_cmd(cmd: VmCmd, state: VmState) -> None:
    """Raise :class:`InvalidState` unless ``cmd`` may be written while the VM is in ``state``."""
    if state not in VM_CMD_ALLOWED_FROM[cmd]:
        allowed = ", ".join(sorted(s.value for s in VM_CMD_ALLOWED_FROM[cmd]))
        raise InvalidState(f"cannot {cmd.value} a VM in state '{state.value}' (only from: {allowed})")


def check_user_cmd(cmd: UserCmd, state: UserState) -> None:
    if state not in USER_CMD_ALLOWED_FROM[cmd]:
        raise InvalidState(f"cannot disconnect: the user is '{state.value}' (only connecting/connected)")


def check_host_cmd(cmd: HostCmd, state: HostState) -> None:
    if state not in HOST_CMD_ALLOWED_FROM[cmd]:
        raise InvalidState(f"cannot {cmd.value} a host in state '{state.value}'")
