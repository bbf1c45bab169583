"""Rootless networking: slirp4netns gives the container's netns a tap0 to the host's stack.

What podman does for rootless containers: a user namespace cannot make veths into the
host's bridge, so a user-mode TCP/IP stack (slirp4netns, Debian's package of it) runs
in the host's network namespace and carries the container's packets as the user's
own sockets. ``-p`` becomes slirp4netns' host forwards (added through its API socket),
so a published port is a socket the user's slirp4netns listens on. Outside addresses
are reached as from the host; the host's own loopback is not (podman's default,
``--disable-host-loopback``).

The process lives as long as the write end of its exit pipe: ``kiln run``'s or the
monitor's. When that process dies, even by SIGKILL, slirp4netns sees the pipe close
and exits: nothing is left to clean up.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess

from runtime.network.ports import PortSpec
from store.errors import KilnError

GUEST_IP = "10.0.2.100"  # slirp4netns --configure's address for the tap
DNS_IP = "10.0.2.3"  # its built-in DNS forwarder


class SlirpError(KilnError):
    pass


def available() -> bool:
    import shutil

    return shutil.which("slirp4netns") is not None


class SlirpPlan:
    """A container's slirp4netns, to start once its PID 1 exists (``connect``)."""

    def __init__(self, port_specs: list[PortSpec], container_id: str):
        from runtime.rootless import host_uid, runtime_dir

        self.ports = [[s.proto, s.host_ip, _host_port(s), s.ctr_port] for s in port_specs]
        # a socket's path must fit 107 bytes: not under the store's containers/<64 hex>
        self.socket_path = os.path.join(runtime_dir(host_uid()),
                                        f"slirp-{container_id[:12]}.sock")
        self.process: subprocess.Popen | None = None
        self._exit_w: int | None = None

    def connect(self, pid: int) -> None:
        exit_r, exit_w = os.pipe()
        ready_r, ready_w = os.pipe()
        try:
            os.set_inheritable(exit_r, True)
            os.set_inheritable(ready_w, True)
            if os.path.lexists(self.socket_path):
                os.unlink(self.socket_path)
            api = [f"--api-socket={self.socket_path}"] if self.ports else []
            self.process = subprocess.Popen(
                ["slirp4netns", "--configure", "--mtu=65520", "--disable-host-loopback",
                 f"--exit-fd={exit_r}", f"--ready-fd={ready_w}", *api, str(pid), "tap0"],
                pass_fds=(exit_r, ready_w), stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        except OSError as e:
            for fd in (exit_r, exit_w, ready_r, ready_w):
                os.close(fd)
            raise SlirpError(f"cannot start slirp4netns: {e.strerror} (install the "
                             "slirp4netns package, or use --network none)") from None
        os.close(exit_r)
        os.close(ready_w)
        self._exit_w = exit_w
        os.set_inheritable(exit_w, False)
        try:
            ready = os.read(ready_r, 1)
        finally:
            os.close(ready_r)
        if ready != b"1":
            message = self._stderr()
            self.close()
            raise SlirpError(f"slirp4netns failed: {message}")
        for proto, host_ip, host_port, ctr_port in self.ports:
            self._forward(proto, host_ip, host_port, ctr_port)

    def _forward(self, proto: str, host_ip: str, host_port: int, ctr_port: int) -> None:
        request = {"execute": "add_hostfwd", "arguments": {
            "proto": proto, "host_addr": host_ip or "0.0.0.0", "host_port": host_port,
            "guest_addr": GUEST_IP, "guest_port": ctr_port}}
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect(self.socket_path)
            s.sendall(json.dumps(request).encode())
            s.shutdown(socket.SHUT_WR)
            answer = b""
            while chunk := s.recv(4096):
                answer += chunk
        try:
            error = json.loads(answer or b"{}").get("error")
        except ValueError:
            error = {"desc": answer.decode("utf-8", "replace")}
        if error or not answer:
            self.close()
            what = (error or {}).get("desc") or "no answer"
            raise SlirpError(f"cannot publish {host_ip or '0.0.0.0'}:{host_port} -> "
                             f"{ctr_port}/{proto}: {what}")

    def _stderr(self) -> str:
        if self.process is None or self.process.stderr is None:
            return "no output"
        try:
            self.process.wait(timeout=5)
            return self.process.stderr.read(4096).decode("utf-8", "replace").strip() or "exited"
        except (OSError, ValueError, subprocess.TimeoutExpired):
            return "exited"

    def close(self) -> None:
        """Stop slirp4netns (closing its exit pipe is enough; the wait reaps it)."""
        if self._exit_w is not None:
            os.close(self._exit_w)
            self._exit_w = None
        if self.process is not None:
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            if self.process.stderr is not None:
                self.process.stderr.close()
            self.process = None
        if os.path.lexists(self.socket_path):
            os.unlink(self.socket_path)


def _host_port(spec: PortSpec) -> int:
    """The spec's host port: the first of its range that is free now, any free one if none."""
    family = socket.AF_INET6 if ":" in spec.host_ip else socket.AF_INET
    kind = socket.SOCK_DGRAM if spec.proto == "udp" else socket.SOCK_STREAM
    for port in spec.host_ports or (0,):
        with socket.socket(family, kind) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as slirp4netns binds
            try:
                s.bind((spec.host_ip or ("::" if family == socket.AF_INET6 else "0.0.0.0"),
                        port))
            except OSError:
                continue
            return s.getsockname()[1]
    ports = spec.host_ports
    where = f"{ports[0]}" if len(ports) == 1 else f"{ports[0]}-{ports[-1]}"
    raise SlirpError(f"host port {where}/{spec.proto} is already in use")
