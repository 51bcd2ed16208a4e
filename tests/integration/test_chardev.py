#!/usr/bin/env python3
"""Integration tests of chardevs: monitors on unix, tcp, telnet, websocket, pty, udp, file and mux chardevs of a
real blockd, ringbuf round trips, busy and missing chardevs, wait=on at start-up; then one QMP script run against
qemu-storage-daemon and blockd with the normalized replies compared entry by entry. Every wait is a read with a
deadline, never a fixed sleep. Exit 77 (skipped) when the oracle is missing and everything else passed."""
import argparse
import base64
import json
import os
import re
import select
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from qmp_harness import Client, Daemon, monitor_args, free_port  # noqa: E402

DEADLINE = 10.0
QSD = shutil.which("qemu-storage-daemon")


def read_until(sock, marker, deadline=DEADLINE):
    """Reads from a socket until `marker` (bytes) has arrived; returns everything read."""
    sock.settimeout(deadline)
    buf = b""
    while marker not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise EOFError("closed after %r" % buf)
        buf += chunk
    return buf


def read_fd_until(fd, marker, deadline=DEADLINE):
    end = time.monotonic() + deadline
    buf = b""
    while marker not in buf:
        left = end - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise TimeoutError("no %r in %r" % (marker, buf))
        buf += os.read(fd, 65536)
    return buf


def start(binary, tmp, extra, stdin=None):
    args, path = monitor_args(tmp, "m0")
    d = Daemon(binary, args + extra, tmp, stdin=stdin)
    c = Client.unix(path)
    c.negotiate()
    return d, c


def chardev(c, label):
    for e in c.cmd("query-chardev")["return"]:
        if e["label"] == label:
            return e
    raise KeyError(label)


# ---- websocket client pieces ------------------------------------------------------------------
def ws_frame(opcode, payload, mask=True):
    head = bytes([0x80 | opcode])
    n = len(payload)
    bit = 0x80 if mask else 0
    if n < 126:
        head += bytes([bit | n])
    elif n < 65536:
        head += bytes([bit | 126]) + struct.pack(">H", n)
    else:
        head += bytes([bit | 127]) + struct.pack(">Q", n)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


class WsReader:
    """Reads server frames (never masked) from a socket, starting with bytes already received."""

    def __init__(self, sock, rest=b""):
        self.sock, self.buf = sock, rest

    def need(self, n):
        self.sock.settimeout(DEADLINE)
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("websocket closed")
            self.buf += chunk

    def frame(self):
        self.need(2)
        op, n, pos = self.buf[0] & 0x0F, self.buf[1] & 0x7F, 2
        assert not self.buf[1] & 0x80, "server frame masked"
        if n == 126:
            self.need(4)
            n, pos = struct.unpack(">H", self.buf[2:4])[0], 4
        elif n == 127:
            self.need(10)
            n, pos = struct.unpack(">Q", self.buf[2:10])[0], 10
        self.need(pos + n)
        payload, self.buf = self.buf[pos:pos + n], self.buf[pos + n:]
        return op, payload


def ws_handshake(port, protocol=True):
    s = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
    key = base64.b64encode(os.urandom(16)).decode()
    req = ("GET / HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           "Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n" % key)
    if protocol:
        req += "Sec-WebSocket-Protocol: binary\r\n"
    s.sendall((req + "\r\n").encode())
    head = read_until(s, b"\r\n\r\n")
    reply, rest = head.split(b"\r\n\r\n", 1)
    import hashlib
    want = base64.b64encode(hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest())
    assert reply.startswith(b"HTTP/1.1 101 Switching Protocols\r\n"), reply
    assert b"\r\nSec-WebSocket-Accept: " + want in reply, reply
    assert (b"Sec-WebSocket-Protocol: binary" in reply) == protocol, reply
    return s, rest


# ---- cases on blockd --------------------------------------------------------------------------
def case_unix_and_tcp_monitors(binary, tmp):
    port = free_port()
    d, c = start(binary, tmp, ["--chardev", f"socket,id=t0,host=127.0.0.1,port={port},server=on,wait=off",
                               "--monitor", "t0"])
    try:
        e = chardev(c, "t0")
        assert e == {"label": "t0", "filename": f"disconnected:tcp:127.0.0.1:{port},server=on",
                     "frontend-open": True}, e
        assert c.cmd("qom-get", {"path": "/chardevs/t0", "property": "connected"}) == {"return": False}
        addr = c.cmd("qom-get", {"path": "/chardevs/t0", "property": "addr"})["return"]
        assert addr == {"type": "inet", "host": "127.0.0.1", "port": str(port), "ipv4": True}, addr
        t = Client.tcp(port)
        t.negotiate()
        assert t.cmd("query-version")["return"]["qemu"]["major"] >= 7
        local = t.sock.getsockname()[1]
        assert chardev(c, "t0")["filename"] == f"tcp:127.0.0.1:{port},server=on <-> 127.0.0.1:{local}"
        assert c.cmd("qom-get", {"path": "/chardevs/t0", "property": "connected"}) == {"return": True}
        assert chardev(c, "m0")["filename"] == "unix:%s/m0.sock,server=on" % tmp
        t.close()
        # The chardev takes the next client once this one is gone.
        t = Client.tcp(port)
        t.negotiate()
        t.close()
    finally:
        d.stop()


def case_telnet_monitor(binary, tmp):
    port = free_port()
    d, c = start(binary, tmp, ["--chardev", f"socket,id=tn,host=127.0.0.1,port={port},server=on,wait=off,telnet=on",
                               "--monitor", "tn"])
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
        got = read_until(s, b"\r\n")
        # WILL ECHO, WILL SUPPRESS-GO-AHEAD, WILL BINARY, DO BINARY; then the greeting.
        assert got.startswith(bytes([255, 251, 1, 255, 251, 3, 255, 251, 0, 255, 253, 0]) + b'{"QMP"'), got
        assert chardev(c, "tn")["filename"].startswith(f"telnet:127.0.0.1:{port},server=on <-> ")
        # Options the client sends back and a split IAC sequence are taken out of the data.
        s.sendall(bytes([255, 253, 1, 255, 251, 24]) + b'{"execute": "qmp_cap' + bytes([255]))
        s.sendall(bytes([251, 3]) + b'abilities"}')
        assert read_until(s, b"\r\n") == b'{"return": {}}\r\n'
        # IAC IAC is one 0xFF data byte; IAC BREAK and a subnegotiation's option byte vanish.
        s.sendall(b'{"execute": "query-version", "id": "a' + bytes([255, 243]) + b'b"}')
        assert json.loads(read_until(s, b"\r\n"))["id"] == "ab"
        s.sendall(b'{"execute": "query-version", "id": "x' + bytes([255, 255]) + b'"}')
        reply = json.loads(read_until(s, b"\r\n"))
        assert reply["error"]["desc"].startswith("JSON parse error"), reply
        assert c.cmd("chardev-send-break", {"id": "tn"}) == {"return": {}}
        s.close()
    finally:
        d.stop()


def case_websocket_monitor(binary, tmp):
    port = free_port()
    d, c = start(binary, tmp, ["--chardev", f"socket,id=ws,host=127.0.0.1,port={port},server=on,wait=off,websocket=on",
                               "--monitor", "ws"])
    try:
        s, rest = ws_handshake(port)
        r = WsReader(s, rest)
        op, greeting = r.frame()
        assert op == 2 and greeting.startswith(b'{"QMP"'), (op, greeting)
        assert chardev(c, "ws")["filename"].startswith(f"websocket:127.0.0.1:{port},server=on <-> ")
        # A request cut over two frames, then a ping.
        s.sendall(ws_frame(2, b'{"execute": "qmp_') + ws_frame(2, b'capabilities"}'))
        assert r.frame() == (2, b'{"return": {}}\r\n')
        s.sendall(ws_frame(9, b"are you there"))
        assert r.frame() == (10, b"are you there")
        big = b'{"execute": "query-version", "id": "' + b"x" * 70000 + b'"}'
        s.sendall(ws_frame(2, big))
        op, payload = r.frame()
        assert op == 2 and json.loads(payload)["id"] == "x" * 70000
        # Unmasked client frames end the connection with QEMU's close frame.
        s.sendall(ws_frame(2, b"{}", mask=False))
        op, payload = r.frame()
        assert (op, payload) == (8, struct.pack(">H", 1002) + b"client frames must be masked"), (op, payload)
        s.settimeout(DEADLINE)
        assert s.recv(100) == b""
        # A plain HTTP request is refused with QEMU's 400.
        h = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
        h.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        reply = b""
        while True:
            chunk = h.recv(4096)
            if not chunk:
                break
            reply += chunk
        assert reply.startswith(b"HTTP/1.1 400 Bad Request\r\nServer: QEMU VNC\r\n"), reply
        # A close frame from the client is answered and the connection ends.
        s, rest = ws_handshake(port, protocol=False)
        r = WsReader(s, rest)
        assert r.frame()[1].startswith(b'{"QMP"')
        s.sendall(ws_frame(8, struct.pack(">H", 1000)))
        assert r.frame() == (8, struct.pack(">H", 1000) + b"peer requested close")
    finally:
        d.stop()


def case_pty_monitor(binary, tmp):
    d, c = start(binary, tmp, ["--chardev", "pty,id=p0", "--monitor", "p0"])
    try:
        name = chardev(c, "p0")["filename"]
        assert re.fullmatch(r"pty:/dev/pts/\d+", name), name
        r = c.cmd("chardev-add", {"id": "p1", "backend": {"type": "pty", "data": {}}})
        assert re.fullmatch(r"/dev/pts/\d+", r["return"]["pty"]), r
        assert chardev(c, "p1")["filename"] == "pty:" + r["return"]["pty"]
        fd = os.open(name[4:], os.O_RDWR | os.O_NOCTTY)
        try:
            greeting = read_fd_until(fd, b"\r\n")
            assert greeting.startswith(b'{"QMP"'), greeting
            os.write(fd, b'{"execute": "qmp_capabilities"}')
            assert read_fd_until(fd, b"\r\n") == b'{"return": {}}\r\n'
            os.write(fd, b'{"execute": "query-version", "id": 5}')
            assert json.loads(read_fd_until(fd, b"\r\n"))["id"] == 5
        finally:
            os.close(fd)
        assert c.cmd("chardev-remove", {"id": "p1"}) == {"return": {}}
    finally:
        d.stop()
    err = d.proc.stderr.read().decode()
    assert re.search(r"char device redirected to /dev/pts/\d+ \(label p0\)", err), err


def case_mux_monitors(binary, tmp):
    path = os.path.join(tmp, "mx.sock")
    d, c = start(binary, tmp, ["--chardev", f"socket,id=mx,path={path},server=on,wait=off,mux=on",
                               "--monitor", "mx", "--monitor", "mx"])
    try:
        assert chardev(c, "mx") == {"label": "mx", "filename": "mux", "frontend-open": True}
        assert chardev(c, "mx-base")["filename"] == f"disconnected:unix:{path},server=on"
        m = socket.socket(socket.AF_UNIX)
        m.settimeout(DEADLINE)
        m.connect(path)
        got = read_until(m, b"\r\n")
        while got.count(b"\r\n") < 2:  # both monitors greet the new connection
            got += read_until(m, b"\r\n")
        assert got.count(b'{"QMP"') == 2, got
        # Input goes to the monitor that joined last; C-a c moves it to the other one.
        m.sendall(b'{"execute": "qmp_capabilities"}')
        assert read_until(m, b"\r\n") == b'{"return": {}}\r\n'
        m.sendall(b'{"execute": "query-version", "id": 1}')
        assert json.loads(read_until(m, b"\r\n"))["id"] == 1
        m.sendall(b"\x01c" + b'{"execute": "query-version", "id": 2}')
        r = json.loads(read_until(m, b"\r\n"))
        assert r["error"]["class"] == "CommandNotFound", r  # the first monitor never negotiated
        m.sendall(b"\x01h")
        assert read_until(m, b"C-a C-a  sends C-a\n\r").startswith(b"\n\rC-a h    print this help\n\r")
        assert c.cmd("chardev-remove", {"id": "mx"}) == {"error": {"class": "GenericError",
                                                                   "desc": "Chardev 'mx' is busy"}}
        assert c.cmd("chardev-remove", {"id": "mx-base"})["error"]["desc"] == "Chardev 'mx-base' is busy"
        assert c.cmd("chardev-change", {"id": "mx", "backend": {"type": "null", "data": {}}}) == {
            "error": {"class": "GenericError", "desc": "Mux device hotswap not supported yet"}}
        m.close()
    finally:
        d.stop()


def case_ringbuf_round_trips(binary, tmp):
    d, c = start(binary, tmp, ["--chardev", "ringbuf,id=r0,size=8", "--chardev", "memory,id=g,size=1k",
                               "--monitor", "g"])
    try:
        assert c.cmd("ringbuf-write", {"device": "r0", "data": "hello"}) == {"return": {}}
        assert c.cmd("ringbuf-read", {"device": "r0", "size": 3}) == {"return": "hel"}
        assert c.cmd("ringbuf-read", {"device": "r0", "size": 100}) == {"return": "lo"}
        # Overflow keeps the newest bytes.
        c.cmd("ringbuf-write", {"device": "r0", "data": "0123456789abc"})
        assert c.cmd("ringbuf-read", {"device": "r0", "size": 100}) == {"return": "56789abc"}
        # Invalid UTF-8 comes back as U+FFFD; base64 both ways is byte-exact.
        raw = b"a\xffb\xc3"
        c.cmd("ringbuf-write", {"device": "r0", "data": base64.b64encode(raw).decode(), "format": "base64"})
        assert c.cmd("ringbuf-read", {"device": "r0", "size": 100}) == {"return": "a\ufffdb\ufffd"}
        c.cmd("ringbuf-write", {"device": "r0", "data": base64.b64encode(raw).decode(), "format": "base64"})
        r = c.cmd("ringbuf-read", {"device": "r0", "size": 100, "format": "base64"})
        assert base64.b64decode(r["return"]) == raw, r
        assert c.cmd("ringbuf-read", {"device": "r0", "size": 0})["error"]["desc"] == "size must be greater than zero"
        assert c.cmd("ringbuf-write", {"device": "r0", "data": "!", "format": "base64"})["error"]["desc"] == \
            "Base64 data contains invalid characters"
        assert c.cmd("ringbuf-read", {"device": "m0", "size": 1})["error"]["desc"] == "m0 is not a ringbuf device"
        assert c.cmd("ringbuf-write", {"device": "nope", "data": ""})["error"]["desc"] == "Device 'nope' not found"
        # A monitor on a memory chardev writes its greeting into the ring.
        greeting = c.cmd("ringbuf-read", {"device": "g", "size": 4096})["return"]
        assert greeting.startswith('{"QMP": ') and greeting.endswith("}\r\n"), greeting
        bad = c.cmd("chardev-add", {"id": "r3", "backend": {"type": "ringbuf", "data": {"size": 3}}})
        assert bad["error"]["desc"] == "Failed to add chardev 'r3': size of ringbuf chardev must be power of two"
    finally:
        d.stop()


def case_busy_missing_and_change(binary, tmp):
    d, c = start(binary, tmp, ["--chardev", "null,id=n0"])
    try:
        assert c.cmd("chardev-remove", {"id": "m0"}) == {"error": {"class": "GenericError",
                                                                   "desc": "Chardev 'm0' is busy"}}
        assert c.cmd("chardev-remove", {"id": "zz"})["error"]["desc"] == "Chardev 'zz' not found"
        assert c.cmd("chardev-change", {"id": "m0", "backend": {"type": "null", "data": {}}})["error"]["desc"] == \
            "Chardev user does not support chardev hotswap"
        assert c.cmd("chardev-change", {"id": "zz", "backend": {"type": "null", "data": {}}})["error"]["desc"] == \
            "Chardev 'zz' does not exist"
        # Without a frontend the chardev is replaced under its id.
        assert c.cmd("chardev-change", {"id": "n0", "backend": {"type": "ringbuf", "data": {"size": 16}}}) == \
            {"return": {}}
        assert chardev(c, "n0")["filename"] == "ringbuf"
        assert c.cmd("chardev-add", {"id": "n0", "backend": {"type": "null", "data": {}}})["error"]["desc"] == \
            "Chardev with id 'n0' already exists"
        assert c.cmd("chardev-remove", {"id": "n0"}) == {"return": {}}
        assert c.cmd("chardev-send-break", {"id": "n0"})["error"]["desc"] == "Chardev 'n0' not found"
        assert "n0" not in [e["name"] for e in c.cmd("qom-list", {"path": "/chardevs"})["return"]]
    finally:
        d.stop()


def file_content(path, done, timeout=10):
    """The file's bytes once `done(bytes)` holds, or whatever is there after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        with open(path, "rb") as f:
            data = f.read()
        if done(data) or time.monotonic() > deadline:
            return data
        time.sleep(0.01)


def case_file_udp_and_logfile(binary, tmp):
    out = os.path.join(tmp, "f.out")
    log = os.path.join(tmp, "m.log")
    lport, rport = free_port(), free_port()
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer.bind(("127.0.0.1", rport))
    peer.settimeout(DEADLINE)
    args, path = monitor_args(tmp, "lg")
    args[1] += f",logfile={log}"
    d = Daemon(binary, args + ["--chardev", f"file,id=f0,path={out}", "--monitor", "f0",
                               "--chardev", f"udp,id=u0,host=127.0.0.1,port={rport},localaddr=127.0.0.1,"
                                            f"localport={lport}", "--monitor", "u0"], tmp)
    try:
        # The udp monitor greets its peer at start-up; each reply is one datagram.
        data, _ = peer.recvfrom(65536)
        assert data.startswith(b'{"QMP"'), data
        peer.sendto(b'{"execute": "qmp_capabilities"}', ("127.0.0.1", lport))
        assert peer.recvfrom(65536)[0] == b'{"return": {}}\r\n'
        c = Client.unix(path)
        c.negotiate()
        assert c.cmd("query-version", id="logged")["id"] == "logged"
        # File output and the log are written through the loop's ring after the replies go out:
        # wait (bounded) until the bytes are there.
        written = file_content(out, lambda b: b.startswith(b'{"QMP"'))
        assert written.startswith(b'{"QMP"'), written
        logged = file_content(log, lambda b: b'{"QMP"' in b and b'"id": "logged"' in b)
        assert b'{"QMP"' in logged and b'"id": "logged"' in logged, logged
    finally:
        d.stop()


def case_wait_on_blocks_start_up(binary, tmp):
    path = os.path.join(tmp, "w.sock")
    pidfile = os.path.join(tmp, "blockd.pid")
    p = subprocess.Popen([binary, "--chardev", f"socket,id=w,path={path},server=on", "--monitor", "w",
                          "--pidfile", pidfile], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE)
    try:
        # The note comes before the wait; the pid file only after a client connected.
        line = p.stderr.readline().decode()
        assert "waiting for connection on: disconnected:unix:%s,server=on" % path in line, line
        assert not os.path.exists(pidfile)
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(DEADLINE)
        s.connect(path)
        assert read_until(s, b"\r\n").startswith(b'{"QMP"')
        assert os.path.exists(pidfile)
        s.close()
    finally:
        p.terminate()
        p.wait(DEADLINE)


def make_pki(d):
    """A CA, a server certificate for localhost/127.0.0.1 and a client certificate, made with certtool."""
    def tool(*args):
        subprocess.run(["certtool", *args], check=True, capture_output=True, timeout=60)

    def template(name, text):
        p = os.path.join(d, name + ".info")
        with open(p, "w") as f:
            f.write(text + "\nexpiration_days = 2\n")
        return p

    for sub in ("srv", "cli"):
        os.mkdir(os.path.join(d, sub))
    tool("--generate-privkey", "--key-type=ecdsa", "--outfile", f"{d}/ca-key.pem")
    tool("--generate-self-signed", "--load-privkey", f"{d}/ca-key.pem", "--template",
         template("ca", "cn = ca\nca\ncert_signing_key"), "--outfile", f"{d}/ca-cert.pem")
    for sub, name, text in (("srv", "server", "cn = localhost\ndns_name = localhost\nip_address = 127.0.0.1\n"
                                              "tls_www_server\nencryption_key\nsigning_key"),
                            ("cli", "client", "country = GB\norganization = blockd\ncn = client1\ntls_www_client\n"
                                              "encryption_key\nsigning_key")):
        tool("--generate-privkey", "--key-type=ecdsa", "--outfile", f"{d}/{sub}/{name}-key.pem")
        tool("--generate-certificate", "--load-privkey", f"{d}/{sub}/{name}-key.pem", "--load-ca-certificate",
             f"{d}/ca-cert.pem", "--load-ca-privkey", f"{d}/ca-key.pem", "--template", template(sub, text),
             "--outfile", f"{d}/{sub}/{name}-cert.pem")
        shutil.copy(f"{d}/ca-cert.pem", f"{d}/{sub}/ca-cert.pem")


def case_tls_server_and_client(binary, tmp):
    import ssl
    if not shutil.which("certtool"):
        print("  (certtool missing: TLS case not run)")
        return
    make_pki(tmp)
    port, cport = free_port(), free_port()
    lsn = socket.create_server(("127.0.0.1", cport))
    d, c = start(binary, tmp, [
        "--object", f"tls-creds-x509,id=srv,endpoint=server,dir={tmp}/srv",
        "--object", f"tls-creds-x509,id=cli,endpoint=client,dir={tmp}/cli",
        "--object", json.dumps({"qom-type": "authz-simple", "id": "az", "identity": "C=GB,O=blockd,CN=client1"}),
        "--chardev", f"socket,id=ts,host=127.0.0.1,port={port},server=on,wait=off,tls-creds=srv,tls-authz=az",
        "--monitor", "ts",
        "--chardev", f"socket,id=tc,host=localhost,port={cport},tls-creds=cli", "--monitor", "tc"])
    try:
        # A monitor behind TLS with a client certificate that tls-authz allows.
        ctx = ssl.create_default_context(cafile=f"{tmp}/ca-cert.pem")
        ctx.load_cert_chain(f"{tmp}/cli/client-cert.pem", f"{tmp}/cli/client-key.pem")
        t = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=DEADLINE), server_hostname="localhost")
        assert read_until(t, b"\r\n").startswith(b'{"QMP"')
        t.sendall(b'{"execute": "qmp_capabilities"}')
        assert read_until(t, b"\r\n") == b'{"return": {}}\r\n'
        assert c.cmd("qom-get", {"path": "/chardevs/ts", "property": "connected"}) == {"return": True}
        t.close()
        # A client without a certificate fails the peer check and never sees a greeting.
        plain = ssl.create_default_context(cafile=f"{tmp}/ca-cert.pem")
        try:
            u = plain.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=DEADLINE),
                                  server_hostname="localhost")
            u.settimeout(DEADLINE)
            assert u.recv(100) == b""
        except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
            pass
        # blockd as the TLS client: its monitor greets this server through TLS.
        lsn.settimeout(DEADLINE)
        raw, _ = lsn.accept()
        sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        sctx.load_cert_chain(f"{tmp}/srv/server-cert.pem", f"{tmp}/srv/server-key.pem")
        srv = sctx.wrap_socket(raw, server_side=True)
        assert read_until(srv, b"\r\n").startswith(b'{"QMP"')
        srv.sendall(b'{"execute": "qmp_capabilities"}')
        assert read_until(srv, b"\r\n") == b'{"return": {}}\r\n'
        srv.close()
    finally:
        lsn.close()
        d.stop()


CASES = [case_unix_and_tcp_monitors, case_telnet_monitor, case_websocket_monitor, case_pty_monitor,
         case_mux_monitors, case_ringbuf_round_trips, case_busy_missing_and_change, case_file_udp_and_logfile,
         case_wait_on_blocks_start_up, case_tls_server_and_client]


# ---- differential -----------------------------------------------------------------------------
def add(id, kind, data):
    return ("chardev-add", {"id": id, "backend": {"type": kind, "data": data}})


SCRIPT = [
    ("query-chardev", None),
    ("query-chardev-backends", None),
    ("qom-list", {"path": "/chardevs"}),
    ("qom-list", {"path": "/chardevs/m0"}),
    ("qom-get", {"path": "/chardevs/m0", "property": "addr"}),
    ("qom-get", {"path": "/chardevs/m0", "property": "connected"}),
    add("rb", "ringbuf", {"size": 16}),
    add("rb", "null", {}),
    add("bad", "ringbuf", {"size": 12}),
    add("vc0", "vc", {}),
    add("mem", "memory", {}),
    add("nul", "null", {"logfile": "TMP/nul.log"}),
    add("fil", "file", {"out": "TMP/out"}),
    add("fil2", "file", {"out": "/nonexistent/x"}),
    add("pt", "pty", {}),
    add("sk", "socket", {"addr": {"type": "unix", "data": {"path": "TMP/sk.sock"}}}),
    add("ab", "socket", {"addr": {"type": "unix", "data": {"path": "TMP/abstract", "abstract": True}}}),
    add("cl", "socket", {"addr": {"type": "unix", "data": {"path": "TMP/none.sock"}}, "server": False}),
    add("tn", "socket", {"addr": {"type": "unix", "data": {"path": "TMP/tn.sock"}}, "telnet": True}),
    add("fdx", "socket", {"addr": {"type": "fd", "data": {"str": "3"}}}),
    add("mx", "mux", {"chardev": "nul"}),
    add("mx2", "mux", {"chardev": "m0"}),
    add("mx3", "mux", {"chardev": "nowhere"}),
    add("u", "udp", {"remote": {"type": "unix", "data": {"path": "x"}}}),
    ("qom-get", {"path": "/chardevs/sk", "property": "addr"}),
    ("qom-get", {"path": "/chardevs/ab", "property": "addr"}),
    ("qom-list", {"path": "/chardevs/sk"}),
    ("qom-list", {"path": "/chardevs/mx"}),
    ("ringbuf-write", {"device": "rb", "data": "hello world, more than sixteen"}),
    ("ringbuf-read", {"device": "rb", "size": 5}),
    ("ringbuf-read", {"device": "rb", "size": 100, "format": "base64"}),
    ("ringbuf-write", {"device": "rb", "data": base64.b64encode(b"ok\xe2\x82(\xf0\x9f\x98\x80\xed\xa0\x80").decode(),
                       "format": "base64"}),
    ("ringbuf-read", {"device": "rb", "size": 100}),
    ("ringbuf-write", {"device": "rb", "data": "YWJj=", "format": "base64"}),
    ("ringbuf-read", {"device": "rb", "size": 100}),
    ("ringbuf-write", {"device": "rb", "data": "a b", "format": "base64"}),
    ("ringbuf-read", {"device": "rb", "size": -1}),
    ("ringbuf-read", {"device": "nul", "size": 1}),
    ("ringbuf-write", {"device": "none", "data": "x"}),
    ("ringbuf-write", {"device": "mem", "data": "memory too"}),
    ("ringbuf-read", {"device": "mem", "size": 6}),
    ("chardev-remove", {"id": "m0"}),
    ("chardev-remove", {"id": "mx"}),
    ("chardev-remove", {"id": "nul"}),
    ("chardev-remove", {"id": "nope"}),
    ("chardev-remove", {"id": "fil"}),
    ("chardev-change", {"id": "nope", "backend": {"type": "null", "data": {}}}),
    ("chardev-change", {"id": "m0", "backend": {"type": "null", "data": {}}}),
    ("chardev-change", {"id": "nul", "backend": {"type": "null", "data": {}}}),
    ("chardev-change", {"id": "mx", "backend": {"type": "null", "data": {}}}),
    ("chardev-change", {"id": "mem", "backend": {"type": "ringbuf", "data": {"size": 4}}}),
    ("chardev-change", {"id": "sk", "backend": {"type": "vc", "data": {}}}),
    ("chardev-send-break", {"id": "tn"}),
    ("chardev-send-break", {"id": "nope"}),
    ("query-chardev", None),
    ("qom-list", {"path": "/chardevs"}),
]


def normalize(reply, tmp):
    text = json.dumps(reply).replace(tmp, "TMP")
    text = re.sub(r"/dev/pts/\d+", "/dev/pts/N", text)
    v = json.loads(text)
    if isinstance(v.get("return"), list):
        # QSD 10.2's hub backend is not in 7.2's list.
        v["return"] = [e for e in v["return"] if e != {"name": "hub"}]
    return v


def run_script(binary, base):
    tmp = tempfile.mkdtemp(prefix="chardev-diff-", dir=base)
    try:
        d, c = start(binary, tmp, [])
        try:
            out = []
            for name, args in SCRIPT:
                if args is not None:
                    args = json.loads(json.dumps(args).replace("TMP", tmp))
                out.append(normalize(c.cmd(name, args), tmp))
            return out
        finally:
            d.stop()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def differential(binary, base):
    want = run_script(QSD, base)
    got = run_script(binary, base)
    assert len(want) == len(got) == len(SCRIPT)
    bad = [(SCRIPT[i], w, g) for i, (w, g) in enumerate(zip(want, got)) if w != g]
    for step, w, g in bad:
        print("  step %s\n    qsd:    %s\n    blockd: %s" % (json.dumps(step), json.dumps(w), json.dumps(g)))
    assert not bad, "%d of %d replies differ" % (len(bad), len(SCRIPT))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--blockd", required=True)
    ap.add_argument("-k", default="")
    a = ap.parse_args()
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    passed = failed = 0
    for case in CASES + [differential]:
        if a.k not in case.__name__:
            continue
        if case is differential and not QSD:
            print("SKIP differential: qemu-storage-daemon not installed")
            continue
        with tempfile.TemporaryDirectory(prefix="blockd-it-", dir=base) as tmp:
            try:
                if case is differential:
                    case(a.blockd, base)
                else:
                    case(a.blockd, tmp)
                passed += 1
                print("PASS", case.__name__)
            except Exception:
                failed += 1
                print("FAIL", case.__name__)
                traceback.print_exc()
    print(f"{passed} passed, {failed} failed")
    if failed:
        return 1
    return 0 if QSD else 77


if __name__ == "__main__":
    sys.exit(main())
