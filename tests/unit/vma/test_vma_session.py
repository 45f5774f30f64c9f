"""The session state machine with a fake nxagent: transitions, actions, timeouts, restart."""

from __future__ import annotations

from pathlib import Path

import pytest

from qvd.core.errors import BackendError, InputError, InvalidState
from qvd.vma.provision import Account
from qvd.vma.session import MSG_CONNECTED, REFRESH_AFTER_RESUME, REFRESH_AFTER_START, SessionRequest
from tests.unit.vma.vma_fakes import TIMEOUTS, Rig, make_rig

WAITING = "Info: Waiting for connection from any host on socket 'tcp:*:4100'."
# nxagent opens its socket right after announcing the session: the rig emits both lines.
STARTING = "Session: Starting session at 'x'.\n" + WAITING
STARTED = "Session: Session started at 'x'."
SUSPENDING = "Session: Suspending session at 'x'."
SUSPENDED = "Session: Session suspended at 'x'."
RESUMING = "Session: Resuming session at 'x'.\n" + WAITING
RESUMED = "Session: Session resumed at 'x'."
TERMINATING = "Session: Terminating session at 'x'."
TERMINATED = "Session: Session terminated at 'x'."
ABORTING = "Session: Aborting session at 'x'."
ABORTED = "Session: Session aborted at 'x'."


def listening(rig: Rig) -> None:
    assert rig.manager.x_start(rig.request()) == "starting"
    rig.emit("Info: Agent running with pid '5000'.", STARTING)
    assert rig.state() == "listening"


def connected(rig: Rig) -> None:
    listening(rig)
    rig.emit(STARTED)
    assert rig.state() == "connected"


def suspended(rig: Rig) -> None:
    connected(rig)
    rig.manager.x_suspend()
    rig.emit(SUSPENDING, SUSPENDED)
    assert rig.state() == "suspended"


def test_starts_stopped(rig: Rig) -> None:
    assert rig.state() == "stopped"


def test_new_session_walk(rig: Rig) -> None:
    assert rig.manager.x_start(rig.request()) == "starting"
    assert rig.state() == "starting"  # nxagent spawned, no output yet
    assert rig.runtime.prepared == [100]
    assert rig.dir.options_file.read_text() == "nx/nx,link=adsl,client=linux,geometry=1024x768,listen=4100:100\n"
    assert [a[0] for a in rig.hooks.actions] == ["pre_connect", "connect"]
    assert rig.dir.pid_file.read_text().strip() == "5000"
    rig.emit(STARTING)
    assert rig.state() == "listening"
    assert rig.dir.state_file.read_text().startswith("starting:")
    assert rig.runtime.desktops == []  # nothing draws before the client is attached
    rig.emit(STARTED)
    assert rig.state() == "connected"
    assert len(rig.runtime.desktops) == 1
    assert rig.hooks.states == ["connected"]
    previous = 0.0
    for delay in REFRESH_AFTER_START:  # a repaint nudge at each delay
        rig.clock.advance(delay - previous + 0.01)
        previous = delay + 0.01
        rig.manager.tick()
    assert rig.runtime.refreshes == len(REFRESH_AFTER_START)


def test_provisioning_state_is_visible(rig: Rig) -> None:
    seen: list[str] = []
    original = rig.runtime.provision

    def spy(request: SessionRequest) -> Account:
        seen.append(str(rig.manager.x_state()))
        return original(request)

    rig.runtime.provision = spy  # type: ignore[method-assign]
    rig.manager.x_start(rig.request())
    assert seen == ["provisioning"]


def test_suspend_and_resume(rig: Rig) -> None:
    connected(rig)
    assert rig.manager.x_suspend() == "ok"
    assert rig.agent.signals == ["HUP"]
    rig.emit(SUSPENDING)
    assert rig.state() == "suspending"
    rig.emit(SUSPENDED)
    assert rig.state() == "suspended"
    assert rig.hooks.states == ["connected", "suspended"]

    assert rig.manager.x_start(rig.request(**{"qvd.client.geometry": "800x600", "qvd.client.link": "modem"})) \
        == "starting"
    assert rig.agent.signals == ["HUP", "HUP"]
    assert "geometry=800x600" in rig.dir.options_file.read_text()
    assert "link=modem" in rig.dir.options_file.read_text()
    assert rig.state() == "starting"
    rig.emit(RESUMING)
    assert rig.state() == "listening"
    rig.emit(RESUMED)
    assert rig.state() == "connected"
    assert len(rig.runtime.desktops) == 1  # not started twice
    before = rig.runtime.refreshes
    for _ in range(len(REFRESH_AFTER_RESUME)):
        rig.clock.advance(max(REFRESH_AFTER_RESUME) + 0.1)
        rig.manager.tick()
    assert rig.runtime.refreshes > before
    assert rig.manager.info()["x_state"] == "connected"


def test_listening_only_once_nxagent_opened_its_socket(rig: Rig) -> None:
    """"Starting/Resuming session" comes a moment before the socket listens: the L7R must not connect yet."""
    rig.manager.x_start(rig.request())
    rig.emit("Session: Starting session at 'x'.")
    assert rig.state() == "starting"
    rig.emit(WAITING)
    assert rig.state() == "listening"
    rig.emit(STARTED, SUSPENDING, SUSPENDED)
    assert rig.manager.x_start(rig.request()) == "starting"
    rig.emit("Session: Resuming session at 'x'.")
    assert rig.state() == "starting"  # the "Waiting" line of the first start does not count again
    rig.emit(WAITING)
    assert rig.state() == "listening"


def test_resume_signal_ignored_goes_back_to_suspended(rig: Rig) -> None:
    connected(rig)
    rig.manager.x_suspend()
    rig.emit(SUSPENDING, SUSPENDED)
    assert rig.manager.x_start(rig.request()) == "starting"
    assert rig.agent.signals == ["HUP", "HUP"]
    rig.clock.advance(TIMEOUTS.listening + 0.1)
    rig.manager.tick()  # nxagent never said "Resuming session"
    assert rig.state() == "suspended"
    assert rig.manager.x_start(rig.request()) == "starting"
    assert rig.agent.signals == ["HUP", "HUP", "HUP"]  # signalled again
    rig.emit(RESUMING, RESUMED)
    assert rig.state() == "connected"


def test_x_start_while_connected_suspends_for_takeover(rig: Rig) -> None:
    connected(rig)
    with pytest.raises(InvalidState) as e:
        rig.manager.x_start(rig.request())
    assert e.value.message == MSG_CONNECTED
    assert rig.agent.signals == ["HUP"]


@pytest.mark.parametrize("line", [STARTING, SUSPENDING, TERMINATING])
def test_x_start_refused_in_other_states(rig: Rig, line: str) -> None:
    rig.manager.x_start(rig.request())
    rig.emit(STARTING, STARTED, line) if line != STARTING else rig.emit(line)
    state = rig.state()
    with pytest.raises(InvalidState) as e:
        rig.manager.x_start(rig.request())
    assert e.value.message == f"Unable to start/resume X session in state {state}, try again in a few minutes"


def test_resume_by_another_user_is_refused(rig: Rig) -> None:
    suspended(rig)
    with pytest.raises(InvalidState):
        rig.manager.x_start(rig.request(**{"qvd.vm.user.name": "mallory"}))
    assert rig.state() == "suspended"


def test_new_session_not_attached_in_time_is_terminated(rig: Rig) -> None:
    listening(rig)
    rig.clock.advance(TIMEOUTS.listening - 1)
    rig.manager.tick()
    assert rig.agent.signals == []
    rig.clock.advance(2)
    rig.manager.tick()
    assert rig.agent.signals == ["TERM"]
    assert rig.state() == "stopping"


def test_resumed_session_not_attached_goes_back_to_suspended(rig: Rig) -> None:
    """Reference bug 10.2.12: the whole session was terminated."""
    suspended(rig)
    rig.manager.x_start(rig.request())
    rig.emit(RESUMING)
    rig.agent.signals.clear()
    rig.clock.advance(TIMEOUTS.listening + 1)
    rig.manager.tick()
    assert rig.agent.signals == ["HUP"]
    rig.emit(SUSPENDING, SUSPENDED)
    assert rig.state() == "suspended"
    rig.clock.advance(TIMEOUTS.stopping * 3)
    rig.manager.tick()
    assert rig.agent.signals == ["HUP"]  # nothing more: the session lives on


def test_resumed_session_that_does_not_suspend_is_stopped(rig: Rig) -> None:
    suspended(rig)
    rig.manager.x_start(rig.request())
    rig.emit(RESUMING)
    rig.agent.signals.clear()
    rig.clock.advance(TIMEOUTS.listening + 1)
    rig.manager.tick()
    rig.clock.advance(TIMEOUTS.suspending + 1)
    rig.manager.tick()
    assert rig.agent.signals == ["HUP", "TERM"]


def test_suspending_too_long_then_kill(rig: Rig) -> None:
    connected(rig)
    rig.manager.x_suspend()
    rig.emit(SUSPENDING)
    rig.agent.signals.clear()
    rig.clock.advance(TIMEOUTS.suspending + 1)
    rig.manager.tick()
    assert rig.agent.signals == ["TERM"]
    assert rig.state() == "stopping"
    rig.clock.advance(TIMEOUTS.stopping + 1)
    rig.manager.tick()
    assert rig.agent.signals == ["TERM", "KILL"]
    rig.agent.running = False
    assert rig.state() == "stopped"


def test_stuck_terminating_is_killed(rig: Rig) -> None:
    connected(rig)
    rig.emit(TERMINATING)
    rig.clock.advance(TIMEOUTS.stopping + 1)
    rig.manager.tick()
    assert rig.agent.signals == ["KILL"]


def test_x_stop_connected(rig: Rig) -> None:
    connected(rig)
    assert rig.manager.x_stop() == "ok"
    assert rig.agent.signals == ["TERM"]
    assert rig.state() == "stopping"
    rig.emit(TERMINATING, TERMINATED)
    assert rig.state() == "stopped"
    rig.agent.running = False
    assert rig.state() == "stopped"
    assert not rig.dir.state_file.exists() and not rig.dir.pid_file.exists()
    assert rig.runtime.desktops[0].group_signals == ["TERM"]
    assert rig.hooks.states == ["connected", "stopped"]
    assert ("stop", "connected", ()) in rig.hooks.actions


def test_x_stop_while_resuming_terms_again_once_suspended(rig: Rig) -> None:
    """nxagent answers SIGTERM in 'resuming' by going back to suspended, so the stop repeats it."""
    suspended(rig)
    rig.manager.x_start(rig.request())
    rig.emit(RESUMING)
    rig.agent.signals.clear()
    rig.manager.x_stop()
    assert rig.agent.signals == ["TERM"]
    rig.emit(SUSPENDING, SUSPENDED)
    rig.manager.tick()
    assert rig.agent.signals == ["TERM", "TERM"]
    assert rig.state() == "stopping"
    rig.emit(TERMINATING, TERMINATED)
    rig.agent.running = False
    assert rig.state() == "stopped"


def test_x_stop_when_stopped_is_a_no_op(rig: Rig) -> None:
    assert rig.manager.x_stop() == "ok"
    assert rig.hooks.actions == []


def test_x_suspend_only_when_listening_or_connected(rig: Rig) -> None:
    assert rig.manager.x_suspend() == "ok"
    assert rig.hooks.actions == []
    suspended(rig)
    rig.agent.signals.clear()
    rig.manager.x_suspend()
    assert rig.agent.signals == []


def test_nxagent_dying_means_stopped(rig: Rig) -> None:
    connected(rig)
    rig.agent.running = False
    assert rig.state() == "stopped"
    assert rig.manager.nx_state.value == "aborted"
    assert not rig.dir.session_file.exists()


def test_logout_stops_the_session(rig: Rig) -> None:
    connected(rig)
    rig.runtime.desktops[0].running = False
    rig.manager.tick()
    assert rig.agent.signals == ["TERM"]
    assert rig.state() == "stopping"


def test_failing_pre_connect_hook_aborts_x_start(rig: Rig) -> None:
    rig.hooks.fail.add("pre_connect")
    with pytest.raises(BackendError):
        rig.manager.x_start(rig.request())
    assert rig.state() == "stopped"
    assert rig.runtime.agents == []


def test_failing_connect_hook_on_resume_keeps_the_session_suspended(rig: Rig) -> None:
    suspended(rig)
    rig.hooks.fail.add("connect")
    signals = list(rig.agent.signals)
    with pytest.raises(BackendError):
        rig.manager.x_start(rig.request())
    assert rig.state() == "suspended"
    assert rig.agent.signals == signals


def test_failing_suspend_hook_aborts_suspend(rig: Rig) -> None:
    connected(rig)
    rig.hooks.fail.add("suspend")
    with pytest.raises(BackendError):
        rig.manager.x_suspend()
    assert rig.agent.signals == []


def test_provisioning_failure_is_reported(rig: Rig) -> None:
    rig.runtime.provision_error = BackendError("useradd failed (exit code 9)")
    assert rig.manager.x_start(rig.request()) == "starting"  # set-up is asynchronous
    assert rig.state() == "stopped"
    assert rig.manager.info()["last_error"] == "useradd failed (exit code 9)"


def test_bad_request_never_changes_state(rig: Rig) -> None:
    with pytest.raises(InputError):
        rig.request(**{"qvd.client.link": "adsl,listen=1"})
    with pytest.raises(InputError):
        rig.request(**{"qvd.vm.user.uid": "0"})
    assert rig.state() == "stopped"


def test_new_session_after_terminated_waits_for_the_old_agent(rig: Rig) -> None:
    connected(rig)
    old = rig.agent
    rig.emit(TERMINATING, TERMINATED)
    assert rig.state() == "stopped"
    old.running = False  # it exits while the new x_start waits for it
    rig.manager.x_start(rig.request())
    assert rig.agent is not old
    rig.emit(STARTING)
    assert rig.state() == "listening"


def test_expire_runs_its_hook_with_the_dates(rig: Rig) -> None:
    assert rig.manager.expire("2026-12-01T00:00", "2026-12-02T00:00") == "ok"
    assert rig.hooks.actions == [
        ("expire", "stopped", (("vm.expiration.soft", "2026-12-01T00:00"), ("vm.expiration.hard", "2026-12-02T00:00")))
    ]


def test_stop_and_wait(rig: Rig) -> None:
    connected(rig)
    rig.emit(TERMINATING, TERMINATED)
    rig.agent.running = False
    assert rig.manager.stop_and_wait(poll=0.001)


def test_info_never_contains_the_log(rig: Rig) -> None:
    connected(rig)
    rig.emit("Info: Authentication cookie 'abc' doesn't match 'secretcookie'.")
    info = rig.manager.info()
    assert "secretcookie" not in repr(info)
    assert info["x_state"] == "connected" and info["user"] == "alice" and info["nx_port"] == 4100


def test_secrets_stay_out_of_the_session_file(rig: Rig) -> None:
    rig.manager.x_start(rig.request(auth_token="tok123", **{"qvd.slave.key": "k456"}))
    text = rig.dir.session_file.read_text()
    assert "tok123" not in text and "k456" not in text
    assert oct(rig.dir.session_file.stat().st_mode & 0o777) == "0o600"


def test_restart_reattaches_to_a_live_agent(tmp_path: Path) -> None:
    first = make_rig(tmp_path)
    suspended(first)
    agent = first.agent
    # A new VMA process: new manager, same state dir, the old nxagent still runs.
    second = make_rig(tmp_path)
    second.runtime.adoptable[agent.pid] = agent
    assert second.manager.reattach()
    assert second.state() == "suspended"
    assert second.manager.info()["user"] == "alice"
    second.manager.x_start(second.request())
    assert agent.signals[-1] == "HUP"
    second.emit(RESUMING, RESUMED)
    assert second.state() == "connected"
    assert second.runtime.desktops == []  # the desktop of the first VMA is still there


def test_restart_with_a_dead_agent_forgets_the_session(tmp_path: Path) -> None:
    first = make_rig(tmp_path)
    connected(first)
    second = make_rig(tmp_path)  # nothing adoptable: the pid is gone
    assert not second.manager.reattach()
    assert second.state() == "stopped"
    assert not second.dir.session_file.exists()


def test_restart_while_connected_before_desktop_start_starts_it(tmp_path: Path) -> None:
    first = make_rig(tmp_path)
    listening(first)
    agent = first.agent
    first.emit(STARTED)  # written by nxagent while no VMA was reading
    second = make_rig(tmp_path)
    second.runtime.adoptable[agent.pid] = agent
    assert second.manager.reattach()
    assert second.state() == "connected"
    # the first VMA did see "started" here (x_state read it) and started the desktop itself
    assert len(first.runtime.desktops) + len(second.runtime.desktops) == 1
