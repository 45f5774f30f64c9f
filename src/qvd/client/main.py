"""``qvd-client``: log in to a QVD node, pick a desktop and show it (through nxproxy).

    qvd-client --host H [--port 8443] --user U [--password P] [--vm ID] [--list]
               [--geometry WxH] [--link adsl] [--fullscreen] [--keyboard pc105/us] [--insecure]

Exit status: 0 session ended normally (or list printed); 1 other error;
2 usage (also: no ``$DISPLAY``); 3 login refused (401); 4 not allowed or under
maintenance (403); 5 VM does not exist (404); 6 client too old (426);
7 server or VM not available (503, the server's text is shown); 8 server
certificate not trusted.

``--nxproxy PATH`` (or ``$QVD_CLIENT_NXPROXY``) runs another program in place
of nxproxy; tests use it.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import logging
import os
import re
import signal
import ssl
import sys
from pathlib import Path

import qvd
from qvd.client.nxproxy import run_session
from qvd.client.pinning import PinResult, PinStore, default_path, pretty, sha256_fingerprint
from qvd.client.protocol import ClientError, L7rConnection, VmEntry, basic_auth

log = logging.getLogger(__name__)

LINKS = ("modem", "isdn", "adsl", "wan", "lan")


class UsageError(ClientError):
    exit_code = 2


class CertificateRefused(ClientError):
    exit_code = 8


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qvd-client", description="Connect to a QVD virtual desktop.")
    p.add_argument("--version", action="version", version=f"qvd-client {qvd.__version__}")
    p.add_argument("--host", required=True, help="QVD node (its L7R) to connect to")
    p.add_argument("--port", type=int, default=8443, help="L7R port (default 8443)")
    p.add_argument("--user", required=True, help="login, optionally login@tenant")
    p.add_argument("--password", help="password (default: $QVD_PASSWORD, else asked)")
    p.add_argument("--vm", type=int, help="id of the virtual machine (default: the only one, or ask)")
    p.add_argument("--list", action="store_true", help="print your virtual machines and exit")
    p.add_argument("--geometry", default="1024x768", help="desktop size WxH (default 1024x768)")
    p.add_argument("--link", default="adsl", choices=LINKS, help="NX link type (default adsl)")
    p.add_argument("--fullscreen", action="store_true", help="full screen desktop")
    p.add_argument("--keyboard", default="pc105/us", help="keyboard model/layout (default pc105/us)")
    p.add_argument("--insecure", action="store_true",
                   help="accept the server certificate on first use without asking (never a changed one)")
    p.add_argument("--no-ssl", action="store_true", help="plain HTTP (only for servers with l7r.use_ssl = false)")
    p.add_argument("--known-hosts", type=Path, help="pinned certificates (default ~/.config/qvd/known_hosts.json)")
    p.add_argument("--nxproxy", default=os.environ.get("QVD_CLIENT_NXPROXY", "nxproxy"),
                   help="nxproxy program (default nxproxy from PATH)")
    p.add_argument("--nxproxy-log", type=Path, help="nxproxy output (default ~/.cache/qvd/nxproxy.log)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug output")
    return p


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def check_options(args: argparse.Namespace) -> None:
    m = re.fullmatch(r"([0-9]{2,5})x([0-9]{2,5})", args.geometry)
    if not m:
        raise UsageError(f"--geometry {args.geometry!r}: expected WIDTHxHEIGHT such as 1280x800")
    if not re.fullmatch(r"[A-Za-z0-9_+-]{1,32}/[A-Za-z0-9_+-]{1,32}(\([A-Za-z0-9_+-]{1,32}\))?", args.keyboard):
        raise UsageError(f"--keyboard {args.keyboard!r}: expected model/layout such as pc105/us")
    if not (0 < args.port < 65536):
        raise UsageError(f"--port {args.port}: expected 1-65535")
    if not args.list and not os.environ.get("DISPLAY"):
        raise UsageError("$DISPLAY is not set: qvd-client shows the desktop on an X server "
                         "(run it in a graphical session, or start Xvfb/Xephyr and set DISPLAY)")


def client_context() -> ssl.SSLContext:
    # Chain and name are not verified here: the certificate is pinned by fingerprint instead
    # (nodes run self-signed certificates), checked before any credential is sent.
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def check_pin(conn: L7rConnection, store: PinStore, *, insecure: bool) -> None:
    der = conn.peer_certificate()
    if der is None:
        raise CertificateRefused("the server sent no certificate")
    fp = sha256_fingerprint(der)
    result, pinned = store.check(conn.host, conn.port, fp)
    if result is PinResult.MATCH:
        return
    if result is PinResult.MISMATCH:
        raise CertificateRefused(
            f"WARNING: the certificate of {conn.host}:{conn.port} CHANGED.\n"
            f"  pinned:  SHA-256 {pretty(pinned or '')}\n"
            f"  offered: SHA-256 {pretty(fp)}\n"
            "Someone may be intercepting the connection, or the server got a new certificate. "
            f"Refusing to connect. If the change is expected, remove the entry '{conn.host}:{conn.port}' "
            f"from {store.path}."
        )
    say(f"The certificate of {conn.host}:{conn.port} is not known yet.\n  SHA-256 {pretty(fp)}")
    if not insecure:
        if not sys.stdin.isatty():
            raise CertificateRefused("unknown server certificate; check the fingerprint with the administrator "
                                     "and accept it with --insecure (first use only)")
        answer = input("Trust it and remember it for next time? [y/N] ").strip().lower()
        if answer not in ("y", "yes"):
            raise CertificateRefused("certificate not accepted")
    store.remember(conn.host, conn.port, fp)
    say(f"Certificate remembered in {store.path}")


def choose_vm(vms: list[VmEntry], wanted: int | None) -> int:
    if wanted is not None:
        return wanted
    if not vms:
        raise ClientError("you have no virtual machines")
    if len(vms) == 1:
        return vms[0].id
    if not sys.stdin.isatty():
        raise UsageError("several virtual machines; choose one with --vm: "
                         + ", ".join(f"{v.id} ({v.name})" for v in vms))
    print_vms(vms)
    while True:
        raw = input("Virtual machine id: ").strip()
        if raw.isdigit() and int(raw) in {v.id for v in vms}:
            return int(raw)
        say("not one of the ids above")


def print_vms(vms: list[VmEntry]) -> None:
    width = max([4, *(len(v.name) for v in vms)])
    print(f"{'ID':>6}  {'NAME':<{width}}  {'STATE':<10}  BLOCKED")
    for v in vms:
        print(f"{v.id:>6}  {v.name:<{width}}  {v.state:<10}  {'yes' if v.blocked else 'no'}")


async def session(args: argparse.Namespace, password: str) -> int:
    # SIGTERM ends the session like Ctrl-C does (asyncio.run cancels the main task on
    # SIGINT): the cancellation unwinds through the splice and stops nxproxy.
    task = asyncio.current_task()
    if task is not None:
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    auth = basic_auth(args.user, password)
    ctx = None if args.no_ssl else client_context()
    conn = await L7rConnection.open(args.host, args.port, auth, ctx)
    try:
        if ctx is not None:
            check_pin(conn, PinStore(args.known_hosts or default_path()), insecure=args.insecure)
        vms = await conn.list_of_vm()
        if args.list:
            print_vms(vms)
            return 0
        vm_id = choose_vm(vms, args.vm)
        params = {
            "qvd.client.os": "linux",
            "qvd.client.link": args.link,
            "qvd.client.geometry": args.geometry,
            "qvd.client.fullscreen": "1" if args.fullscreen else "",
            "qvd.client.keyboard": args.keyboard,
        }
        say(f"Connecting to virtual machine {vm_id}...")
        switched = await conn.connect_to_vm(vm_id, params, on_info=lambda info: say(f"  {info}"))
        log.debug("slave key %s", switched.slave_key)
        say("Connected; starting nxproxy")
        log_path = args.nxproxy_log or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qvd" / \
            "nxproxy.log"
        result = await run_session((conn.reader, conn.writer), switched.trailing, args.nxproxy, log_path=log_path)
        say(f"Session ended ({'you closed it' if result.ended_by == 'nxproxy' else 'closed by the server'}; "
            f"{result.bytes_up} bytes sent, {result.bytes_down} received)")
        return 0
    finally:
        await conn.close()


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="qvd-client: %(levelname)s %(message)s")
    try:
        check_options(args)
        password = args.password or os.environ.get("QVD_PASSWORD")
        if not password:
            if not sys.stdin.isatty():
                raise UsageError("no password: give --password, set $QVD_PASSWORD or run in a terminal")
            password = getpass.getpass(f"Password for {args.user}: ")
        return asyncio.run(session(args, password))
    except ClientError as e:
        say(f"qvd-client: {e.message}")
        return e.exit_code
    except KeyboardInterrupt:
        say("qvd-client: interrupted")
        return 130
    except asyncio.CancelledError:
        say("qvd-client: terminated")
        return 143


if __name__ == "__main__":
    sys.exit(main())
