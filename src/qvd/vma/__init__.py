"""VMA: the agent inside every desktop (control API, NX session, user provisioning, hooks).

Runs on the desktop image's python3 with the standard library only; it may
import ``qvd.core.config`` and ``qvd.core.errors`` and nothing else of QVD-py
(a unit test checks it).  Installed as ``/usr/lib/qvd/python/qvd/{__init__.py,core/,vma/}``
and started as::

    PYTHONPATH=/usr/lib/qvd/python python3 -m qvd.vma [--config /etc/qvd/vma.toml]
        [--port 3030] [--address 0.0.0.0] [--state-dir /run/qvd] [--log-file PATH]

Modules:

=============  ==================================================================
``rpc``        HTTP/SimpleRPC server (knows nothing of sessions)
``main``       command line, the RPC methods, signals, monitor thread
``session``    the NX session state machine, actions and timeouts
``nx``         NX/X states, nxagent log parsing
``options``    validation of the client's options, nxagent options line
``desktop``    the real runtime: nxagent, desktop programs, session environment
``provision``  user, groups and home
``hooks``      administrator hooks
``procs``      every process started, signalled or reaped (the privileged calls)
``statedir``   files that survive a VMA restart
=============  ==================================================================

Image requirements: ``nxagent``, ``python3`` (3.11+), ``passwd`` (useradd,
groupadd, usermod, userdel), a window manager and terminal (``openbox``,
``xterm``) or a session command in ``vma.x-session``, ``x11-xserver-utils``
(``xrefresh``: without it the first screen often stays black), ``tini`` as PID
1 (so that the VMA can be restarted), fonts (``xfonts-base``), and ``tzdata``
if clients send a time zone (without it the name is only checked for syntax).

Restart: the VMA keeps a live session when it restarts (the reference lost
it).  nxagent runs in its own session with its output in a file, so a new VMA
re-reads that file and knows the state; it identifies the process by pid and
start time.  Limits: a restart needs an init other than the VMA (``tini``) or
the container stops with it; after a restart the desktop session leader is
watched by pid only (its exit status is unknown); if ``nxagent.log`` was
deleted, only the last state written to ``nxagent.state`` and the pid's
liveness are known until nxagent logs again.
"""
