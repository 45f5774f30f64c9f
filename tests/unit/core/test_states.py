"""Walk every transition of every state machine: legal ones pass, all others raise."""

from __future__ import annotations

import itertools

import pytest

from qvd.core.errors import IllegalTransition, InvalidState
from qvd.core.states import (
    HOST_CMD_ALLOWED_FROM,
    HOST_TRANSITIONS,
    USER_CMD_ALLOWED_FROM,
    USER_TRANSITIONS,
    VM_CMD_ALLOWED_FROM,
    VM_TRANSITIONS,
    HostCmd,
    HostState,
    UserCmd,
    UserState,
    VmCmd,
    VmState,
    check_host_cmd,
    check_host_transition,
    check_user_cmd,
    check_user_transition,
    check_vm_cmd,
    check_vm_transition,
)

MACHINES = [
    (VmState, VM_TRANSITIONS, check_vm_transition),
    (UserState, USER_TRANSITIONS, check_user_transition),
    (HostState, HOST_TRANSITIONS, check_host_transition),
]


@pytest.mark.parametrize(("enum", "table", "check"), MACHINES, ids=["vm", "user", "host"])
def test_every_pair(enum, table, check) -> None:  # type: ignore[no-untyped-def]
    assert set(table) == set(enum), "every state has a row"
    legal = illegal = 0
    for old, new in itertools.product(enum, enum):
        if new in table[old]:
            check(old, new)
            legal += 1
        else:
            with pytest.raises(IllegalTransition) as e:
                check(old, new)
            assert old.value in str(e.value) and new.value in str(e.value)
            illegal += 1
    assert legal > 0 and illegal > 0


def test_no_self_loops_and_all_states_reachable() -> None:
    for enum, table, _ in MACHINES:
        for s in enum:
            assert s not in table[s]
        reachable = set().union(*table.values())
        start = next(iter(enum))
        assert reachable | {start} == set(enum)


def test_vm_lifecycle_path() -> None:
    path = [VmState.STOPPED, VmState.STARTING, VmState.RUNNING, VmState.STOPPING, VmState.STOPPED]
    for a, b in itertools.pairwise(path):
        check_vm_transition(a, b)
    with pytest.raises(IllegalTransition):
        check_vm_transition(VmState.STOPPED, VmState.RUNNING)
    with pytest.raises(IllegalTransition):
        check_vm_transition(VmState.ZOMBIE, VmState.RUNNING)


@pytest.mark.parametrize(
    ("cmd", "table", "states", "check"),
    [
        (VmCmd.START, VM_CMD_ALLOWED_FROM, VmState, check_vm_cmd),
        (VmCmd.STOP, VM_CMD_ALLOWED_FROM, VmState, check_vm_cmd),
        (UserCmd.ABORT, USER_CMD_ALLOWED_FROM, UserState, check_user_cmd),
        (HostCmd.STOP, HOST_CMD_ALLOWED_FROM, HostState, check_host_cmd),
    ],
)
def test_commands_only_from_allowed_states(cmd, table, states, check) -> None:  # type: ignore[no-untyped-def]
    for s in states:
        if s in table[cmd]:
            check(cmd, s)
        else:
            with pytest.raises(InvalidState):
                check(cmd, s)
