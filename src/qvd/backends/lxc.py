"""LXC backend: one privileged LXC 5 container per desktop, driven through the lxc-* CLIs.

Layout under the node root (``QVD_ROOT``)::

    storage/basefs/<di_id>/             the DI unpacked once per node, read-only lower layer
    storage/basefs/.lock-<di_id>        flock serialising the unpack of one DI
    storage/overlays/<vm_id>/upper      the desktop's system layer (overlayfs upper)
    storage/overlays/<vm_id>/work       overlayfs work dir (LXC derives it from upper's parent)
    storage/overlays/<vm_id>/.persistent  present when the layer is kept between starts
    storage/homes/<home_key>/           persistent, bind-mounted on /home in the desktop
                                        (``path.storage.homes`` moves it, e.g. to shared storage)
    run/lxc/qvd-<vm_id>/config          generated LXC config (lxc-* -P run/lxc)
    run/lxc/qvd-<vm_id>/net-up          LXC network hook: isolates the veth before init runs
    log/lxc/qvd-<vm_id>.log             LXC's own log
    log/lxc/qvd-<vm_id>.console.log     the container's console: the VMA's stderr

The overlay is mounted by LXC inside the container's mount namespace, so it
vanishes with the container and never shows in the node's mount table.

Inside the desktop, PID 1 is ``tini`` (reaps orphans) running ``/usr/sbin/qvd-vma
--port <vma_port>``; the VMA reads ``/etc/qvd/vma.toml``, which :meth:`start`
writes into the system layer from the node's ``vma.*``, ``internal.nxagent.*`` and
``log.level`` keys (``spec.extra`` may override those keys per desktop) plus the
display that matches ``spec.nx_port`` (NX port = 4000 + display).

Network: veth ``qvd<vm_id>`` on ``vm.network.bridge``, eth0 in the desktop with
``spec.address``; the node's own address on the bridge is :func:`bridge_address`.
The policy (no desktop<->desktop, on one node or across nodes; no desktop->node; any
node -> any desktop through the uplink of a cluster; no routing) is described in
:mod:`qvd.backends.netsetup`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import ipaddress
import json
import logging
import os
import re
import secrets
import shutil
import signal
from pathlib import Path
from typing import ClassVar

from qvd.backends import netsetup
from qvd.backends.base import Backend, DesktopInfo, DesktopSpec, Endpoint, register
from qvd.core.config import KEYS, Config, Paths
from qvd.core.errors import BackendError, ImageError
from qvd.images.validate import inspect_di_tarball

log = logging.getLogger(__name__)

CONTAINER_PREFIX = "qvd-"
VETH_PREFIX = "qvd"
VMA_LAUNCHER = "/usr/sbin/qvd-vma"
VMA_CONFIG = "etc/qvd/vma.toml"
TINI = "/usr/bin/tini"

_REQUIRED_TOOLS = ("lxc-start", "lxc-stop", "lxc-info", "lxc-attach", "ip", "bridge", "tar", "umount")

_MAC = re.compile(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}")
_HOME_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@+-]{0,127}")
_PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# Timeouts of the privileged commands, seconds.
_T_LXC_START = 60.0
_T_LXC_STOP = 30.0
_T_LXC_INFO = 10.0
_T_UNTAR = 900.0
_STOP_WAIT = 10.0

# Capabilities the desktop never needs.  net_admin is dropped so that nobody in the
# desktop can change its address or MAC (spoofing another desktop).
_CAP_DROP = ("audit_control mac_admin mac_override net_admin sys_boot sys_module sys_pacct "
             "sys_rawio sys_time syslog wake_alarm")

# Device nodes a desktop may use (cgroup v1 devices controller); everything else,
# in particular the node's disks, is denied even if a node shows up in the image.
_DEVICES_ALLOWED = (
    "c 1:3 rwm",  # null
    "c 1:5 rwm",  # zero
    "c 1:7 rwm",  # full
    "c 1:8 rwm",  # random
    "c 1:9 rwm",  # urandom
    "c 5:0 rwm",  # tty
    "c 5:1 rwm",  # console
    "c 5:2 rwm",  # ptmx
    "c 136:* rwm",  # pts
)

_VMA_KEY_PREFIXES = ("vma.", "internal.nxagent.")


def _vma_key(name: str) -> bool:
    return name in KEYS and (name.startswith(_VMA_KEY_PREFIXES) or name == "log.level")


def _toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    return json.dumps(str(v), ensure_ascii=True)  # a JSON string is a TOML basic string


def container_name(vm_id: int) -> str:
    return f"{CONTAINER_PREFIX}{vm_id}"


def veth_name(vm_id: int) -> str:
    return netsetup.check_ifname(f"{VETH_PREFIX}{vm_id}")


def desktop_network(cfg: Config) -> tuple[ipaddress.IPv4Network, ipaddress.IPv4Address]:
    """(the desktop network, its first desktop address) from ``vm.network.ip.start``/``netmask``."""
    start = cfg.get_str("vm.network.ip.start")
    mask = cfg.get_str("vm.network.netmask")
    try:
        return ipaddress.IPv4Network(f"{start}/{mask}", strict=False), ipaddress.IPv4Address(start)
    except ValueError as e:
        raise BackendError(f"vm.network.ip.start/vm.network.netmask do not form a network: {e}") from None


def bridge_address(cfg: Config) -> ipaddress.IPv4Interface:
    """The node's address on the desktop network: ``vm.network.host.address`` when set (a cluster:
    one address per node, in the host range network + 1 .. ip.start - 1), else the gateway
    (``vm.network.gateway`` or network + 1)."""
    net, first_desktop = desktop_network(cfg)
    gw_raw = cfg.get_str("vm.network.gateway")
    try:
        gw = ipaddress.IPv4Address(gw_raw) if gw_raw else net.network_address + 1
    except ValueError:
        raise BackendError(f"invalid vm.network.gateway {gw_raw!r}: expected an IPv4 address") from None
    if gw not in net:
        raise BackendError(f"vm.network.gateway {gw} is outside the desktop network {net}")
    host_raw = cfg.get_str("vm.network.host.address").strip()
    if not host_raw:
        return ipaddress.IPv4Interface(f"{gw}/{net.prefixlen}")
    try:
        host = ipaddress.IPv4Address(host_raw)
    except ValueError:
        raise BackendError(f"invalid vm.network.host.address {host_raw!r}: expected an IPv4 address") from None
    if host not in net:
        raise BackendError(f"vm.network.host.address {host} is outside the desktop network {net}")
    if not net.network_address < host < first_desktop:
        raise BackendError(f"vm.network.host.address {host} is not in the nodes' range of the desktop network: "
                           f"it must be from {net.network_address + 1} to {first_desktop - 1} "
                           f"(desktops start at vm.network.ip.start = {first_desktop})")
    return ipaddress.IPv4Interface(f"{host}/{net.prefixlen}")


def _hostname(spec: DesktopSpec) -> str:
    h = re.sub(r"[^A-Za-z0-9-]+", "-", spec.name).strip("-")[:63].strip("-")
    return h or container_name(spec.vm_id)


def _check_spec(spec: DesktopSpec) -> None:
    if spec.vm_id <= 0:
        raise BackendError(f"invalid vm_id {spec.vm_id}")
    try:
        iface = ipaddress.IPv4Interface(f"{spec.address}/{spec.prefix_len}")
        ipaddress.IPv4Address(spec.gateway)
    except ValueError as e:
        raise BackendError(f"VM {spec.vm_id}: invalid network settings: {e}") from None
    if iface.ip in (iface.network.network_address, iface.network.broadcast_address):
        raise BackendError(f"VM {spec.vm_id}: {spec.address}/{spec.prefix_len} is not a host address")
    if not _MAC.fullmatch(spec.mac):
        raise BackendError(f"VM {spec.vm_id}: invalid MAC address {spec.mac!r}")
    if not _HOME_KEY.fullmatch(spec.home_key) or ".." in spec.home_key:
        raise BackendError(f"VM {spec.vm_id}: invalid home key {spec.home_key!r}")
    if spec.memory_mb < 32:
        raise BackendError(f"VM {spec.vm_id}: memory of {spec.memory_mb} MB is too small (at least 32)")
    if not 4001 <= spec.nx_port <= 5000:
        raise BackendError(f"VM {spec.vm_id}: NX port {spec.nx_port} is not 4000 + a display from 1 to 1000")
    if not 1 <= spec.vma_port <= 65535:
        raise BackendError(f"VM {spec.vm_id}: invalid VMA port {spec.vma_port}")
    for k in spec.extra:
        if not _vma_key(k):
            raise BackendError(f"VM {spec.vm_id}: the LXC backend does not accept the setting {k!r}")


def _cgroup_version() -> int:
    """1 when the v1 memory controller is mounted (this lab's hybrid layout), else 2, else 0."""
    if Path("/sys/fs/cgroup/memory/memory.limit_in_bytes").exists():
        return 1
    controllers = Path("/sys/fs/cgroup/cgroup.controllers")
    if controllers.exists() and "memory" in controllers.read_text().split():
        return 2
    return 0


@register("lxc")
class LxcBackend(Backend):
    """Desktops as LXC containers on an overlayfs over a per-node unpacked DI."""

    name: ClassVar[str] = "lxc"

    def __init__(self, root: Path, cfg: Config) -> None:
        self.root = root
        self.cfg = cfg
        self.bridge = netsetup.check_ifname(cfg.get_str("vm.network.bridge"))
        self.firewall = cfg.get_bool("internal.vm.network.firewall.enable")
        self.storage = root / "storage"
        self.basefs = self.storage / "basefs"
        self.overlays = self.storage / "overlays"
        self.homes = Paths.for_node(root, cfg).homes  # path.storage.homes: shared by a cluster's nodes
        self.lxcpath = root / "run" / "lxc"
        self.logdir = root / "log" / "lxc"
        self._di_locks: dict[int, asyncio.Lock] = {}

    # --- paths -----------------------------------------------------------------------------------

    def base_dir(self, di_id: int) -> Path:
        return self.basefs / str(di_id)

    def overlay_dir(self, vm_id: int) -> Path:
        return self.overlays / str(vm_id)

    def home_dir(self, home_key: str) -> Path:
        return self.homes / home_key

    def run_dir(self, vm_id: int) -> Path:
        return self.lxcpath / container_name(vm_id)

    def log_file(self, vm_id: int) -> Path:
        return self.logdir / f"{container_name(vm_id)}.log"

    def console_file(self, vm_id: int) -> Path:
        return self.logdir / f"{container_name(vm_id)}.console.log"

    # --- interface -------------------------------------------------------------------------------

    @classmethod
    def supported(cls) -> tuple[bool, str]:
        if os.geteuid() != 0:
            return False, "the LXC backend needs root (privileged containers)"
        missing = [t for t in _REQUIRED_TOOLS if shutil.which(t) is None]
        if missing:
            return False, f"missing tools: {', '.join(missing)} (apt-get install lxc iproute2 tar)"
        try:
            if "overlay" not in Path("/proc/filesystems").read_text():
                return False, "the kernel has no overlayfs"
        except OSError:
            return False, "cannot read /proc/filesystems"
        if _cgroup_version() == 0:
            return False, "no cgroup memory controller: desktop memory limits cannot be enforced"
        return True, ""

    async def check(self) -> None:
        ok, why = self.supported()
        if not ok:
            raise BackendError(f"LXC backend unusable: {why}")
        missing = [t for t in ("iptables", "nft") if shutil.which(t) is None] if self.firewall else []
        if missing:
            raise BackendError(f"{' and '.join(missing)} missing: needed to isolate desktops "
                               "(apt-get install iptables nftables, or set internal.vm.network.firewall.enable "
                               "= false)")
        for d in (self.basefs, self.overlays, self.homes, self.lxcpath, self.logdir):
            d.mkdir(parents=True, exist_ok=True)
        for d in (self.basefs, self.overlays, self.lxcpath):
            for doomed in d.glob(".deleteme-*"):
                await self._remove_tree(doomed)  # an earlier delete was interrupted
        await netsetup.ensure_bridge(self.bridge, bridge_address(self.cfg))
        if self.firewall:
            self._check_bridge_ports()
            net, first_desktop = desktop_network(self.cfg)
            await netsetup.ensure_firewall(self.bridge, net, first_desktop, VETH_PREFIX)

    def _check_bridge_ports(self) -> None:
        """Refuse an uplink named like a desktop's veth: the firewall would treat it as one."""
        for port in netsetup.bridge_ports(self.bridge):
            if port.startswith(VETH_PREFIX) and not re.fullmatch(re.escape(VETH_PREFIX) + r"[0-9]+", port):
                raise BackendError(f"bridge {self.bridge} has a port named {port}: names starting with "
                                   f"{VETH_PREFIX!r} are reserved for desktops' veths (the firewall treats them "
                                   "as desktop ports); rename that interface")

    async def teardown_network(self) -> None:
        """Remove the bridge and its firewall rules (tests, node decommissioning).

        Not part of the Backend interface; desktops on the bridge lose their network.
        """
        await netsetup.delete_bridge(self.bridge)

    async def list_desktops(self) -> list[DesktopInfo]:
        ids: set[int] = set()
        if self.lxcpath.is_dir():
            for d in self.lxcpath.iterdir():
                m = re.fullmatch(re.escape(CONTAINER_PREFIX) + r"([0-9]+)", d.name)
                if m and d.is_dir():
                    ids.add(int(m.group(1)))
        # Leftovers whose run dir is already gone: a veth on our bridge, a mount.
        for port in netsetup.bridge_ports(self.bridge) if netsetup.link_exists(self.bridge) else []:
            m = re.fullmatch(re.escape(VETH_PREFIX) + r"([0-9]+)", port)
            if m:
                ids.add(int(m.group(1)))
        for mp in netsetup.mounts_under(self.root):
            m = re.match(re.escape(str(self.lxcpath)) + "/" + re.escape(CONTAINER_PREFIX) + r"([0-9]+)(/|$)", mp) \
                or re.match(re.escape(str(self.overlays)) + r"/([0-9]+)(/|$)", mp)
            if m:
                ids.add(int(m.group(1)))
        infos = []
        for vm_id in sorted(ids):
            state, pid = await self._lxc_state(vm_id)
            infos.append(DesktopInfo(vm_id=vm_id, running=state not in ("STOPPED", ""), pid=pid))
        return infos

    async def prepare(self, spec: DesktopSpec) -> None:
        _check_spec(spec)
        base = await self._ensure_base(spec.di_id, spec.image)
        for rel in (VMA_LAUNCHER.lstrip("/"), "usr/bin/python3"):
            if not (base / rel).exists() and not (base / rel).is_symlink():
                raise BackendError(f"DI {spec.di_id} ({spec.image}) has no /{rel}: it cannot run the QVD agent")
        home = self.home_dir(spec.home_key)
        if not home.is_dir():
            home.mkdir(parents=True, exist_ok=True)
            home.chmod(0o755)
        if await self.is_running(spec.vm_id):
            return  # a prepare repeated after start must not pull the system layer away
        ov = self.overlay_dir(spec.vm_id)
        marker = ov / ".persistent"
        if ov.exists() and not (spec.persistent_overlay and marker.exists()):
            await self._remove_tree(ov)
        (ov / "upper").mkdir(parents=True, exist_ok=True)
        (ov / "work").mkdir(exist_ok=True)
        if spec.persistent_overlay:
            marker.touch()

    async def start(self, spec: DesktopSpec) -> None:
        _check_spec(spec)
        if await self.is_running(spec.vm_id):
            return
        base = self.base_dir(spec.di_id)
        upper = self.overlay_dir(spec.vm_id) / "upper"
        home = self.home_dir(spec.home_key)
        if not (base.is_dir() and upper.is_dir() and home.is_dir()):
            raise BackendError(f"VM {spec.vm_id}: start() before prepare(): base, system layer or home missing")
        veth = veth_name(spec.vm_id)
        if netsetup.link_exists(veth):
            # A veth left by a crashed run would make lxc-start fail with EEXIST.
            await netsetup.delete_link(veth)
        if not netsetup.is_bridge(self.bridge):
            raise BackendError(f"bridge {self.bridge} is missing: check() was not run")
        self._write_system_files(spec, base, upper)
        run_dir = self.run_dir(spec.vm_id)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.logdir.mkdir(parents=True, exist_ok=True)
        hook = run_dir / "net-up"
        self._write_net_hook(hook, veth)
        config = self.render_config(spec, base, upper, home, hook)
        tmp = run_dir / "config.tmp"
        tmp.write_text(config)
        tmp.replace(run_dir / "config")
        with contextlib.suppress(FileNotFoundError):
            self.console_file(spec.vm_id).unlink()  # the console log of this boot only
        res = await self._lxc(["lxc-start", "-d"], spec.vm_id, timeout=_T_LXC_START, check=False)
        if res.returncode != 0 or not await self.is_running(spec.vm_id):
            why = (res.stderr.strip().splitlines() or [f"exit status {res.returncode}"])[-1]
            raise BackendError(f"VM {spec.vm_id}: the container did not start: {why}{self._log_tail(spec.vm_id)}")
        if self.firewall:
            # The net-up hook isolated the port before init ran; check it, and fix it
            # if a hand-edited config dropped the hook.
            await netsetup.isolate_port(veth)
        log.info("VM %d: container %s started (%s on %s)", spec.vm_id, container_name(spec.vm_id),
                 spec.address, self.bridge)

    async def is_running(self, vm_id: int) -> bool:
        state, _ = await self._lxc_state(vm_id)
        return state not in ("STOPPED", "")

    def endpoint_vma(self, spec: DesktopSpec) -> Endpoint:
        return Endpoint(spec.address, spec.vma_port)

    def endpoint_nx(self, spec: DesktopSpec) -> Endpoint:
        return Endpoint(spec.address, spec.nx_port)

    async def stop(self, vm_id: int) -> None:
        if not await self.is_running(vm_id):
            return
        # -k: SIGKILL to init, the kernel then kills the whole PID namespace.
        await self._lxc(["lxc-stop", "-k"], vm_id, timeout=_T_LXC_STOP, check=False)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _STOP_WAIT
        while await self.is_running(vm_id):
            if loop.time() > deadline:
                raise BackendError(f"VM {vm_id}: container still running after lxc-stop -k")
            await asyncio.sleep(0.1)
        log.info("VM %d: container stopped", vm_id)

    async def cleanup(self, vm_id: int) -> None:
        await self.stop(vm_id)
        self._kill_monitor(vm_id)
        run_dir = self.run_dir(vm_id)
        ov = self.overlay_dir(vm_id)
        for d in (run_dir, ov):
            await netsetup.unmount_under(d)
        veth = f"{VETH_PREFIX}{vm_id}"
        if netsetup.link_exists(veth) and netsetup.link_master(veth) in (None, self.bridge):
            # A veth on another bridge belongs to another QVD root on this machine.
            await netsetup.delete_link(veth)
        if run_dir.exists():
            await self._remove_tree(run_dir)
        if ov.exists() and not (ov / ".persistent").exists():
            await self._remove_tree(ov)

    # --- storage ---------------------------------------------------------------------------------

    async def _ensure_base(self, di_id: int, image: Path) -> Path:
        """Unpack the DI once per node; concurrent callers (any process) wait for one unpack."""
        final = self.base_dir(di_id)
        if final.is_dir():
            return final
        lock = self._di_locks.setdefault(di_id, asyncio.Lock())
        async with lock:
            self.basefs.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.basefs / f".lock-{di_id}", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                await self._flock(fd, f"DI {di_id}")
                if final.is_dir():
                    return final
                for stale in self.basefs.glob(f".untar-{di_id}-*"):
                    await self._remove_tree(stale)  # left by a killed unpack; we hold its lock
                if not image.is_file():
                    raise BackendError(f"DI {di_id}: image file {image} not found")
                try:
                    meta = await asyncio.to_thread(inspect_di_tarball, image)
                except ImageError as e:
                    raise BackendError(f"DI {di_id}: {e.message}") from None
                tmp = self.basefs / f".untar-{di_id}-{os.getpid()}-{secrets.token_hex(4)}"
                tmp.mkdir(mode=0o755)
                try:
                    log.info("DI %d: unpacking %s (%s, %d files)", di_id, image, meta.profile, meta.members)
                    await self._untar(image, tmp)
                    tmp.chmod(0o755)
                    tmp.rename(final)
                finally:
                    if tmp.exists():
                        await self._remove_tree(tmp)
                return final
            finally:
                os.close(fd)  # also releases the flock

    @staticmethod
    async def _flock(fd: int, what: str) -> None:
        # Polling keeps the event loop free and the wait cancellable.
        waited = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise
            if not waited:
                log.info("waiting for another process unpacking %s", what)
                waited = True
            await asyncio.sleep(0.2)

    async def _remove_tree(self, path: Path) -> None:
        """Delete a tree of ours, never through a mount inside it."""
        await netsetup.unmount_under(path)
        # Rename first so that a half-deleted tree is never mistaken for a live one.
        doomed = path.with_name(f".deleteme-{path.name}-{secrets.token_hex(4)}")
        try:
            path.rename(doomed)
        except FileNotFoundError:
            return
        await asyncio.to_thread(shutil.rmtree, doomed)

    def _write_system_files(self, spec: DesktopSpec, base: Path, upper: Path) -> None:
        """Files of this boot, written into the system layer before the container starts."""
        hostname = _hostname(spec)
        self._upper_file(base, upper, "etc/hostname", hostname + "\n")
        self._upper_file(base, upper, "etc/hosts",
                         f"127.0.0.1\tlocalhost\n{spec.address}\t{hostname}\n"
                         "::1\tlocalhost ip6-localhost ip6-loopback\n")
        values: dict[str, object] = {k: v for k, v in self.cfg.values.items() if _vma_key(k)}
        values.update(spec.extra)
        values["internal.nxagent.display"] = spec.nx_port - 4000
        values["internal.vm.port.vma"] = spec.vma_port
        body = "".join(f"{json.dumps(k)} = {_toml_value(v)}\n" for k, v in sorted(values.items()))
        self._upper_file(base, upper, VMA_CONFIG, "# Written by the QVD node at each start.\n" + body)

    @staticmethod
    def _upper_file(base: Path, upper: Path, rel: str, text: str) -> None:
        # Directories created in the upper layer copy owner and mode from the lower
        # one; otherwise the merged view would show e.g. /etc with our umask.
        parts = Path(rel).parts
        for i in range(1, len(parts)):
            sub = Path(*parts[:i])
            dst = upper / sub
            if not dst.is_dir():
                dst.mkdir()
                src = base / sub
                st = src.stat() if src.is_dir() else None
                os.chown(dst, st.st_uid if st else 0, st.st_gid if st else 0)
                dst.chmod(st.st_mode & 0o7777 if st else 0o755)
        f = upper / rel
        tmp = f.with_name(f".{f.name}.tmp")
        tmp.write_text(text)
        tmp.chmod(0o644)
        tmp.replace(f)

    def _write_net_hook(self, path: Path, veth: str) -> None:
        bridge_tool = shutil.which("bridge") or "/usr/sbin/bridge"
        # LXC runs this on the node right after attaching the veth to the bridge,
        # before the container's init exists: no window in which desktops see each
        # other.  The veth name is fixed per desktop, so no hook arguments are needed.
        text = ("#!/bin/sh\n# Generated by QVD: isolate the desktop's bridge port.\n"
                f"exec {bridge_tool} link set dev {netsetup.check_ifname(veth)} isolated on 2>&1\n")
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        tmp.chmod(0o700)
        tmp.replace(path)

    def render_config(self, spec: DesktopSpec, base: Path, upper: Path, home: Path, net_hook: Path) -> str:
        """The LXC config of one desktop (pure; public for tests and for operators' eyes)."""
        init = [TINI, "--"] if (base / TINI.lstrip("/")).exists() else []
        init += [VMA_LAUNCHER, "--port", str(spec.vma_port)]
        mem = f"{spec.memory_mb}M"
        lines = [
            f"# Generated by QVD for VM {spec.vm_id}; rewritten at each start.",
            f"lxc.uts.name = {_hostname(spec)}",
            f"lxc.rootfs.path = overlay:{base}:{upper}",
            f"lxc.init.cmd = {' '.join(init)}",
            f"lxc.environment = {_PATH_ENV}",
            "lxc.environment = LANG=C.UTF-8",
            f"lxc.environment = QVD_VM_ID={spec.vm_id}",
            "lxc.mount.auto = proc:mixed sys:ro cgroup:mixed",
            "lxc.autodev = 1",
            "lxc.tty.max = 0",
            "lxc.pty.max = 256",  # without ptys xterm fails: 'get_pty: not enough ptys' (lab notes)
            "lxc.mount.entry = tmpfs tmp tmpfs rw,nosuid,nodev,size=256m,mode=1777 0 0",
            "lxc.mount.entry = tmpfs run tmpfs rw,nosuid,nodev,size=64m,mode=755 0 0",
            "lxc.mount.entry = tmpfs dev/shm tmpfs rw,nosuid,nodev,size=64m,mode=1777,create=dir 0 0",
            f"lxc.mount.entry = {home} home none bind,create=dir 0 0",
            f"lxc.cap.drop = {_CAP_DROP}",
            f"lxc.log.file = {self.log_file(spec.vm_id)}",
            "lxc.log.level = WARN",
            f"lxc.console.logfile = {self.console_file(spec.vm_id)}",
            "lxc.console.size = 1MB",
        ]
        if _cgroup_version() == 1:
            lines.append(f"lxc.cgroup.memory.limit_in_bytes = {mem}")
            if Path("/sys/fs/cgroup/memory/memory.memsw.limit_in_bytes").exists():
                lines.append(f"lxc.cgroup.memory.memsw.limit_in_bytes = {mem}")  # no swap on top
            lines.append("lxc.cgroup.pids.max = 1024")
            lines.append("lxc.cgroup.devices.deny = a")
            lines += [f"lxc.cgroup.devices.allow = {d}" for d in _DEVICES_ALLOWED]
        else:
            lines += [f"lxc.cgroup2.memory.max = {mem}", "lxc.cgroup2.memory.swap.max = 0",
                      "lxc.cgroup2.pids.max = 1024", "lxc.cgroup2.devices.deny = a"]
            lines += [f"lxc.cgroup2.devices.allow = {d}" for d in _DEVICES_ALLOWED]
        lines += [
            "lxc.net.0.type = veth",
            f"lxc.net.0.link = {self.bridge}",
            f"lxc.net.0.veth.pair = {veth_name(spec.vm_id)}",
            "lxc.net.0.name = eth0",
            "lxc.net.0.flags = up",
            f"lxc.net.0.hwaddr = {spec.mac.lower()}",
            f"lxc.net.0.ipv4.address = {spec.address}/{spec.prefix_len}",
            f"lxc.net.0.ipv4.gateway = {spec.gateway}",
        ]
        if self.firewall:
            lines.append(f"lxc.net.0.script.up = {net_hook}")
        return "\n".join(lines) + "\n"

    def _log_tail(self, vm_id: int, n: int = 8) -> str:
        out = []
        for f in (self.log_file(vm_id), self.console_file(vm_id)):
            with contextlib.suppress(OSError):
                lines = [ln for ln in f.read_text(errors="replace").splitlines() if ln.strip()][-n:]
                if lines:
                    out.append(f"\n--- {f} ---\n" + "\n".join(lines))
        return "".join(out)

    # --- privileged commands (lxc-*, tar, kill) --------------------------------------------------

    async def _lxc(self, argv: list[str], vm_id: int, *, timeout: float,
                   check: bool = True) -> netsetup.CommandResult:
        return await netsetup.run([argv[0], "-n", container_name(vm_id), "-P", str(self.lxcpath), *argv[1:]],
                                  timeout=timeout, check=check)

    async def _lxc_state(self, vm_id: int) -> tuple[str, int | None]:
        """("RUNNING"/"STOPPED"/..., init pid); ("", None) when LXC knows no such container."""
        if not (self.run_dir(vm_id) / "config").exists():
            return "", None
        res = await self._lxc(["lxc-info", "-s", "-p"], vm_id, timeout=_T_LXC_INFO, check=False)
        if res.returncode != 0:
            return "", None
        fields: dict[str, str] = {}
        for line in res.stdout.splitlines():
            key, _, value = line.partition(":")
            fields[key.strip().lower()] = value.strip()
        pid_raw = fields.get("pid", "")
        return fields.get("state", ""), int(pid_raw) if pid_raw.isdigit() else None

    async def _untar(self, image: Path, dest: Path) -> None:
        # GNU tar detects the compression itself; root keeps owners and modes.
        await netsetup.run(["tar", "-x", "--numeric-owner", "-f", str(image), "-C", str(dest)], timeout=_T_UNTAR)

    def _kill_monitor(self, vm_id: int) -> None:
        """Kill a hung '[lxc monitor] <lxcpath> <name>' of this container (and only this one)."""
        wanted = f"[lxc monitor] {self.lxcpath} {container_name(vm_id)}"
        for p in Path("/proc").iterdir():
            if not p.name.isdigit():
                continue
            try:
                cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            except OSError:
                continue
            if cmd == wanted:
                log.warning("VM %d: killing leftover LXC monitor %s", vm_id, p.name)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(p.name), signal.SIGKILL)
