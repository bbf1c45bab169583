"""Bridge networking of kiln run: real veth pairs, bridges, nftables NAT and published
ports; the "outside world" is a network namespace the test makes (no traffic leaves)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from runtime.network.networks import NETWORK_DIR
from tests.runtime.conftest import kiln_argv

SERVE = "mkdir -p /www && echo served-by-$HOSTNAME > /www/index.html && exec httpd -f -p 80 -h /www"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                return r.read().decode()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    return {line.split(": ")[1].split("@")[0] for line in out.splitlines()}


def _nft_ports() -> str:
    p = subprocess.run(["nft", "-j", "list", "table", "ip", "kiln"], capture_output=True,
                       text=True)
    if p.returncode != 0:
        return ""
    maps = [o["map"] for o in json.loads(p.stdout)["nftables"] if "map" in o]
    return json.dumps(sorted((m["name"], json.dumps(m.get("elem", []))) for m in maps))


def _leases() -> set[str]:
    out = set()
    if os.path.isdir(NETWORK_DIR):
        for d in os.listdir(NETWORK_DIR):
            if d.endswith(".leases"):
                out |= {f"{d}/{ip}" for ip in os.listdir(os.path.join(NETWORK_DIR, d))}
    return out


def _state() -> tuple:
    """What kiln's networking holds on the host: veths, port mappings, leases."""
    return ({n for n in _links() if n.startswith("kv")}, _nft_ports(), _leases())


def _settled(before: tuple, timeout: float = 5.0) -> tuple:
    deadline = time.monotonic() + timeout
    while (now := _state()) != before and time.monotonic() < deadline:
        time.sleep(0.05)
    return now


class Background:
    """``kiln run`` of a long-running container, stopped (SIGTERM to kiln) at the end."""

    def __init__(self, root, *args: str):
        # httpd as PID 1 ignores SIGTERM: kiln kills it a second later
        self.proc = subprocess.Popen(kiln_argv(root, "run", "--rm", "--stop-timeout", "1", *args),
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def stop(self) -> tuple[int, str, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        out, err = self.proc.communicate(timeout=20)
        return self.proc.returncode, out.decode(), err.decode()


@pytest.fixture
def bg(run_root):
    started: list[Background] = []

    def start(*args: str) -> Background:
        b = Background(run_root, *args)
        started.append(b)
        return b

    yield start
    for b in started:
        b.stop()


@pytest.fixture
def user_network(krun):
    made = []

    def create(*opts: str) -> str:
        name = f"kt{os.urandom(3).hex()}"
        p = krun.cli("network", "create", *opts, name, check=True)
        assert len(p.out.strip()) == 64
        made.append(name)
        return name

    yield create
    for name in made:
        krun.cli("network", "rm", name, check=False)


def _host_address() -> str | None:
    """An address of the host on a real interface (not loopback, not a kiln bridge)."""
    out = subprocess.run(["ip", "-4", "-o", "addr", "show", "scope", "global"],
                         capture_output=True, text=True).stdout
    for line in out.splitlines():
        fields = line.split()
        if not fields[1].startswith(("kiln", "kbr-", "kv", "podman", "cni", "veth")):
            return fields[3].split("/")[0]
    return None


def test_default_bridge_address_route_hosts_resolv(krun):
    p = krun("sh", "-c", "ip -4 -o addr show eth0; ip route; cat /etc/hosts /etc/resolv.conf; "
             "hostname", opts=("--add-host", "db.example:192.0.2.77", "--dns", "192.0.2.53"))
    assert p.returncode == 0, p.err
    out = p.out
    ip = out.split("inet ")[1].split("/")[0]
    assert ip.startswith("10.89."), out
    assert "default via 10.89.0.1 dev eth0" in out
    hostname = out.strip().splitlines()[-1]
    assert f"{ip}\t{hostname}" in out  # its own name resolves to its address
    assert "192.0.2.77\tdb.example" in out
    assert "nameserver 192.0.2.53" in out and out.count("nameserver") == 1
    # --network none and host keep what they were
    none = krun("ip", "-o", "link", opts=("--network", "none")).out
    assert "eth0" not in none and "lo:" in none


def test_published_port_from_loopback_host_and_bridge_address(krun, bg, run_root):
    before = _state()
    port = _free_port()
    c = bg("--name", f"web{port}", "-p", f"{port}:80", "probe", "sh", "-c", SERVE)
    assert _get(f"http://127.0.0.1:{port}/").startswith("served-by-")
    assert _get(f"http://10.89.0.1:{port}/").startswith("served-by-")  # the bridge's address
    host = _host_address()
    if host:
        assert _get(f"http://{host}:{port}/").startswith("served-by-")
    # another container reaches it through the host's published port (hairpin NAT)
    p = krun("wget", "-qO-", f"http://10.89.0.1:{port}/")
    assert p.returncode == 0 and p.out.startswith("served-by-"), p.err
    ps = krun.cli("ps").out
    assert f"0.0.0.0:{port}->80/tcp" in ps and f"web{port}" in ps
    assert krun.cli("port", f"web{port}").out == f"80/tcp -> 0.0.0.0:{port}\n"
    assert krun.cli("port", f"web{port}", "80").out == f"0.0.0.0:{port}\n"
    code, _out, err = c.stop()
    assert code in (0, 137, 143), err
    assert _settled(before) == before  # no veth, port mapping or lease left behind
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1)


def test_publish_on_one_address_and_ranges_and_all(krun, bg, run_root, tmp_path):
    p1, p2 = _free_port(), _free_port()
    c = bg("-p", f"127.0.0.1:{p1}:80", "probe", "sh", "-c", SERVE)
    assert _get(f"http://127.0.0.1:{p1}/").startswith("served-by-")
    with pytest.raises(OSError):  # published on 127.0.0.1 only
        urllib.request.urlopen(f"http://10.89.0.1:{p1}/", timeout=1)
    c.stop()
    # -P: every EXPOSEd port to a free host port, which kiln port tells
    (tmp_path / "Containerfile").write_text("FROM probe\nEXPOSE 80 8081/udp\n")
    krun.cli("build", "-q", "-t", "exposing", str(tmp_path), check=True)
    c = bg("--name", f"pall{p2}", "-P", "exposing", "sh", "-c", SERVE)
    deadline = time.monotonic() + 10
    while "80/tcp" not in (out := krun.cli("port", f"pall{p2}", check=False).out):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    host_port = int(krun.cli("port", f"pall{p2}", "80/tcp").out.rsplit(":", 1)[1])
    assert "8081/udp -> 0.0.0.0:" in out
    assert _get(f"http://127.0.0.1:{host_port}/").startswith("served-by-")
    c.stop()


def test_publish_a_range(krun, bg):
    low = _free_port()
    while any(not _port_free(p) for p in (low, low + 1)):
        low = _free_port()
    c = bg("-p", f"{low}-{low + 1}:80-81", "probe", "sh", "-c",
           "mkdir -p /a /b && echo on-80 > /a/index.html && echo on-81 > /b/index.html && "
           "httpd -p 81 -h /b && exec httpd -f -p 80 -h /a")
    assert _get(f"http://127.0.0.1:{low}/") == "on-80\n"
    assert _get(f"http://127.0.0.1:{low + 1}/") == "on-81\n"
    c.stop()


UDP_ECHO = """
import os, socket, sys
from runtime import syscalls
fd = os.open(f"/proc/{sys.argv[1]}/ns/net", os.O_RDONLY)
syscalls.setns(fd, syscalls.CLONE_NEWNET)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 5353))
print("ready", flush=True)
while True:
    data, peer = s.recvfrom(100)
    s.sendto(b"echo " + data, peer)
"""


def _udp_ask(address: str, port: int, text: bytes) -> bytes:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(3)
        s.sendto(text, (address, port))
        return s.recvfrom(100)[0]


def test_published_udp_port_carries_datagrams_both_ways(krun, bg, run_root):
    """busybox has no UDP server, so the server is a host process that joined the
    container's network namespace: the datagrams still go through kiln's NAT and veth."""
    before = _state()
    port = _free_port()
    name = f"udp{port}"
    c = bg("--name", name, "-p", f"{port}:5353/udp", "probe", "sleep", "60")
    deadline = time.monotonic() + 10
    while not (pid := json.loads(krun.cli("inspect", name, check=False).out or "[{}]")[0]
               .get("State", {}).get("Pid")):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    server = subprocess.Popen([sys.executable, "-c", UDP_ECHO, str(pid)],
                              stdout=subprocess.PIPE, text=True,
                              cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    try:
        assert server.stdout.readline() == "ready\n"
        assert _udp_ask("127.0.0.1", port, b"one") == b"echo one"
        assert _udp_ask("10.89.0.1", port, b"two") == b"echo two"
        assert f"0.0.0.0:{port}->5353/udp" in krun.cli("ps").out
    finally:
        server.kill()
        server.wait()
    c.stop()
    assert _settled(before) == before


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def test_port_conflicts_and_bad_specs_are_clear_errors(krun, bg, run_root):
    before = _state()
    port = _free_port()
    c = bg("-p", f"{port}:80", "probe", "sh", "-c", SERVE)
    _get(f"http://127.0.0.1:{port}/")
    p = krun("true", opts=("-p", f"{port}:80"))
    assert p.returncode == 125
    assert f"cannot publish 0.0.0.0:{port}/tcp: port is already allocated" in p.err
    c.stop()
    with socket.socket() as holder:  # a program on the host holds the port
        holder.bind(("0.0.0.0", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        p = krun("true", opts=("-p", f"{taken}:80"))
        assert p.returncode == 125 and "port is already allocated" in p.err
    for bad, why in [("80:80:80:80", "want [IP:][HOST:]CONTAINER"), ("x:80", "host port 'x'"),
                     ("70000:80", "not within 1-65535"), ("80/icmp", "unknown protocol"),
                     ("8000-8002:80-81", "differ in length"), ("1.2.3:80:80", "not an IP")]:
        p = krun("true", opts=("-p", bad))
        assert p.returncode == 125 and f"invalid -p {bad!r}" in p.err and why in p.err, p.err
    p = krun("true", opts=("--network", "none", "-p", "80"))
    assert p.returncode == 125 and "-p need a bridge network" in p.err
    assert _settled(before) == before
    left = krun.cli("ps", "-a").out.splitlines()[1:]
    assert left == []  # no container left half-made (the rows say which, if one is)


def test_user_network_names_follow_containers(krun, bg, user_network, run_root):
    net = user_network()
    srv = f"srv-{net}"
    bg("--network", net, "--name", srv, "--network-alias", "api", "probe", "sh", "-c", SERVE)
    # a later container finds it by name and by alias
    deadline = time.monotonic() + 10
    while (p := krun("wget", "-qO-", f"http://{srv}/", opts=("--network", net))).returncode:
        assert time.monotonic() < deadline, p.err
        time.sleep(0.1)
    assert p.out.startswith("served-by-")
    assert krun("wget", "-qO-", "http://api/", opts=("--network", net)).out.startswith("served")
    # the earlier container sees a newcomer appear in its /etc/hosts, and leave again
    watcher = f"w-{net}"
    w = bg("--network", net, "--name", watcher, "probe", "sh", "-c",
           "touch /tmp/ready; until grep -q late-$NET /etc/hosts; do sleep 0.05; done; "
           "touch /tmp/seen; while grep -q late-$NET /etc/hosts; do sleep 0.05; done; "
           "echo gone".replace("$NET", net))
    _until_exec(krun, watcher, "/tmp/ready")
    late = bg("--network", net, "--name", f"late-{net}", "probe", "sleep", "30")
    _until_exec(krun, watcher, "/tmp/seen")
    late.stop()
    w.proc.wait(timeout=10)
    code, out, err = w.stop()
    assert (code, out) == (0, "gone\n"), err
    # the default bridge does not resolve names (Docker's rule)
    assert krun("wget", "-qO-", f"http://{srv}/").returncode != 0


def _until_exec(krun, container: str, path: str, timeout: float = 10.0) -> None:
    """Until ``path`` exists in the running container (kiln exec test -e)."""
    deadline = time.monotonic() + timeout
    while krun.cli("exec", container, "test", "-e", path, check=False).returncode:
        assert time.monotonic() < deadline, f"{path} never appeared in {container}"
        time.sleep(0.05)


def test_network_commands(krun, user_network):
    net = user_network("--subnet", "10.91.7.0/24", "--gateway", "10.91.7.254")
    ls = krun.cli("network", "ls").out
    assert "bridge" in ls and net in ls and "10.91.7.0/24" in ls
    info = json.loads(krun.cli("network", "inspect", net).out)[0]
    assert info["IPAM"]["Config"] == [{"Subnet": "10.91.7.0/24", "Gateway": "10.91.7.254"}]
    bridge = info["Options"]["com.docker.network.bridge.name"]
    assert bridge in _links()
    p = krun("sh", "-c", "ip -4 -o addr show eth0; ip route",
             opts=("--network", net, "--ip", "10.91.7.9"))
    assert "inet 10.91.7.9/24" in p.out and "default via 10.91.7.254" in p.out, p.err
    for args, why in [(("network", "create", net), "already exists"),
                      (("network", "create", "--subnet", "10.91.7.0/25", f"{net}x"), "overlaps"),
                      (("network", "create", "--subnet", "nonsense", f"{net}y"),
                       "invalid --subnet"),
                      (("network", "create", "bad/name"), "invalid network name"),
                      (("network", "create", "host"), "reserved"),
                      (("network", "rm", "bridge"), "cannot be removed"),
                      (("network", "rm", "nosuchnet"), "not found"),
                      (("run", "--rm", "--network", net, "--ip", "10.1.1.1", "probe", "true"),
                       "not a free host address"),
                      (("run", "--rm", "--network", "nosuchnet", "probe", "true"), "not found")]:
        p = krun.cli(*args, check=False)
        assert p.returncode == 125 and why in p.err, (args, p.err)
    krun.cli("network", "rm", net, check=True)
    assert bridge not in _links() and net not in krun.cli("network", "ls").out


def test_network_in_use_cannot_be_removed(krun, bg, user_network):
    net = user_network()
    c = bg("--network", net, "--name", f"busy-{net}", "probe", "sleep", "30")
    deadline = time.monotonic() + 10
    while not json.loads(krun.cli("network", "inspect", net).out)[0]["Containers"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    p = krun.cli("network", "rm", net, check=False)
    assert p.returncode == 125 and f"in use by busy-{net}" in p.err
    c.stop()


def test_share_another_containers_network(krun, bg):
    name = f"netowner{os.getpid()}"
    bg("--name", name, "probe", "sh", "-c", SERVE)
    deadline = time.monotonic() + 10
    while (p := krun("wget", "-qO-", "http://127.0.0.1/",
                     opts=("--network", f"container:{name}"))).returncode:
        assert time.monotonic() < deadline, p.err
        time.sleep(0.1)
    assert p.out.startswith("served-by-")
    # Docker gives the joining container the other's hostname, and refuses options that
    # the other container's network owns
    owner = krun("wget", "-qO-", "http://127.0.0.1/", opts=("--network", f"container:{name}"))
    joined = krun("hostname", opts=("--network", f"container:{name}"))
    assert owner.out == f"served-by-{joined.out.strip()}\n", (owner.out, joined.out)
    for flag, value in (("--hostname", "h"), ("--dns", "192.0.2.1"), ("--add-host", "a:1.2.3.4")):
        p = krun("true", opts=("--network", f"container:{name}", flag, value))
        assert p.returncode == 125 and f"conflicting options: {flag} and --network" in p.err
    p = krun("true", opts=("--network", "container:nosuchcontainer"))
    assert p.returncode == 125 and "no such container: nosuchcontainer" in p.err


class Outside:
    def __init__(self, address: str, host_side: str, log):
        self.address = address
        self.host_side = host_side
        self.log = log


@pytest.fixture
def outside_world(tmp_path):
    """A network namespace playing the internet: a web server at 10.199.<n>.2 behind a veth
    from the host (10.199.<n>.1/30), which logs the client addresses it sees."""
    tag = os.urandom(2).hex()
    ns, host_if = f"kiln-out-{tag}", f"kvo{tag}"
    sub = int(tag, 16) % 250
    www = tmp_path / "www"
    www.mkdir()
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "link", "add", host_if, "type", "veth", "peer", "name", "eth0",
                        "netns", ns], check=True)
        subprocess.run(["ip", "addr", "add", f"10.199.{sub}.1/30", "dev", host_if], check=True)
        subprocess.run(["ip", "link", "set", host_if, "up"], check=True)
        for cmd in (["ip", "addr", "add", f"10.199.{sub}.2/30", "dev", "eth0"],
                    ["ip", "link", "set", "eth0", "up"], ["ip", "link", "set", "lo", "up"]):
            subprocess.run(["ip", "netns", "exec", ns, *cmd], check=True)
        (www / "index.html").write_text("from-outside\n")
        log = tmp_path / "httpd.log"
        with open(log, "wb") as f:
            server = subprocess.Popen(["ip", "netns", "exec", ns, "busybox", "httpd", "-f", "-v",
                                       "-p", "8000", "-h", str(www)], stderr=f)
        try:
            yield Outside(f"10.199.{sub}.2", f"10.199.{sub}.1", log)
        finally:
            server.kill()
            server.wait()
    finally:
        subprocess.run(["ip", "link", "del", host_if], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def test_container_reaches_outside_through_nat(krun, outside_world):
    url = f"http://{outside_world.address}:8000/"
    p = krun("sh", "-c", f"wget -qO- {url} && ip -4 -o addr show eth0")
    assert p.returncode == 0 and "from-outside" in p.out, p.err
    own = p.out.split("inet ")[1].split("/")[0]
    seen = outside_world.log.read_text()
    assert outside_world.host_side in seen and own not in seen  # masqueraded
    # an internal network has no way out
    p = krun.cli("network", "create", "--internal", f"int{os.getpid()}", check=True)
    try:
        p = krun("wget", "-T", "2", "-qO-", url,
                 opts=("--network", f"int{os.getpid()}"))
        assert p.returncode != 0
    finally:
        krun.cli("network", "rm", f"int{os.getpid()}", check=False)


def test_twenty_containers_at_once_get_distinct_addresses(run_root):
    before = _state()
    procs = [subprocess.Popen(kiln_argv(run_root, "run", "--rm", "probe", "sh", "-c",
                                        "ip -4 -o addr show eth0; sleep 1"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for _ in range(20)]
    addresses = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()
        addresses.append(out.decode().split("inet ")[1].split("/")[0])
    assert len(set(addresses)) == 20, addresses
    assert _settled(before) == before


def test_kill_9_of_kiln_is_cleaned_up_by_the_next_call(krun, run_root):
    before = _state()
    port = _free_port()
    proc = subprocess.Popen(kiln_argv(run_root, "run", "--rm", "-p", f"{port}:80", "probe",
                                      "sh", "-c", SERVE),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _get(f"http://127.0.0.1:{port}/")
    held = _state()
    assert held != before
    proc.kill()
    proc.wait()
    time.sleep(0.2)
    assert _leases() == held[2]  # nothing ran that could release it yet
    krun.cli("network", "ls", check=True)  # any networking call collects what is stale
    krun.cli("network", "inspect", "bridge", check=True)
    assert _settled(before) == before
    # and the --rm container that kiln was to remove goes at the next look at the list
    assert krun.cli("ps", "-a").out.splitlines()[1:] == []
    assert not any(e.name != ".cache" for e in os.scandir(run_root / "containers"))


def test_a_reused_address_answers_at_once(krun, bg, user_network):
    """An address handed out again comes with the same MAC (made of the address, as
    Docker's), and the bridge's MAC is fixed: the host's ARP entry for the previous holder
    stays right. With random MACs, while another container keeps the bridge's MAC from
    changing (which would flush the cache), the host sent to the old MAC for ~30 s."""
    net = user_network()
    bg("--network", net, "probe", "sleep", "60")
    port = _free_port()
    for _ in range(3):
        c = bg("--network", net, "--ip", _ip_on(krun, net, 5), "-p", f"{port}:80", "probe",
               "sh", "-c", SERVE)
        t = time.monotonic()
        assert _get(f"http://127.0.0.1:{port}/", timeout=15).startswith("served-by-")
        assert time.monotonic() - t < 5
        c.stop()
        _settled_port(port)


def _ip_on(krun, net: str, host: int) -> str:
    subnet = json.loads(krun.cli("network", "inspect", net).out)[0]["IPAM"]["Config"][0]
    return subnet["Subnet"].rsplit(".", 1)[0] + f".{host}"


def _settled_port(port: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while f"{port}" in _nft_ports() and time.monotonic() < deadline:
        time.sleep(0.05)


def test_rm_f_of_a_detached_container_takes_its_network_down(krun):
    before = _state()
    port = _free_port()
    cid = krun.cli("run", "-d", "-p", f"{port}:80", "probe", "sh", "-c", SERVE,
                   check=True).out.strip()
    _get(f"http://127.0.0.1:{port}/")
    assert _state() != before
    krun.cli("rm", "-f", cid, check=True)
    assert _state() == before  # at once: rm waited for (or did) the release
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1)

