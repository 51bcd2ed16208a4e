#!/usr/bin/env python3
"""Integration tests of blockd's own behaviour over real sockets: monitors on every chardev kind, iothreads,
shutdown paths, robustness. Each case starts a fresh daemon in a temp dir and waits on events, not sleeps."""
import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from qmp_harness import DATA, Client, Daemon, monitor_args, free_port, thread_names  # noqa: E402
DEADLINE = 10.0


# ----------------------------------------------------------------------------------------------
def case_unimplemented_commands_are_command_not_found(binary, tmp):
    args, path = monitor_args(tmp)
    d = Daemon(binary, args, tmp)
    try:
        c = Client.unix(path)
        c.negotiate()
        implemented = {x["name"] for x in c.cmd("query-commands")["return"]}
        assert {"qmp_capabilities", "query-version", "query-commands", "query-qmp-schema", "quit", "object-add",
                "object-del"} <= implemented, implemented
        with open(os.path.join(DATA, "qsd-newest-command-names.txt")) as f:
            all_cmds = [line.strip() for line in f if line.strip() and not line.startswith("#")]
        schema = c.cmd("query-qmp-schema")["return"]
        in_schema = {e["name"] for e in schema if e["meta-type"] == "command"}
        assert in_schema == implemented, (in_schema ^ implemented)
        for name in all_cmds:
            if name in implemented:
                continue
            r = c.cmd(name, {}, id=name)
            assert r == {"id": name, "error": {"class": "CommandNotFound",
                                               "desc": f"The command {name} has not been found"}}, r
        assert c.cmd("quit") == {"return": {}}
        assert c.eof()
    finally:
        assert d.stop() == 0


def case_tcp_monitor_and_two_clients_in_turn(binary, tmp):
    port = free_port()
    d = Daemon(binary, ["--chardev", f"socket,id=t0,host=127.0.0.1,port={port},server=on,wait=off",
                        "--monitor", "t0"], tmp)
    try:
        c1 = Client.tcp(port)
        c1.negotiate()
        assert c1.cmd("query-version", id=1)["return"]["qemu"]["major"] == 10
        c1.close()
        # One client at a time; after the first leaves, the next one gets a fresh greeting.
        c2 = Client.tcp(port)
        c2.line()
        r = c2.cmd("query-version", id=2)
        assert r["error"]["class"] == "CommandNotFound", r
        c2.close()
    finally:
        assert d.stop() == 0


def case_stdio_monitor_quit(binary, tmp):
    d = Daemon(binary, ["--chardev", "stdio,id=s0", "--monitor", "s0"], tmp, stdin=subprocess.PIPE)
    out = d.proc.stdout
    greeting = json.loads(out.readline())
    assert greeting["QMP"]["capabilities"] == ["oob"]
    d.proc.stdin.write(b'{"execute": "qmp_capabilities", "id": 1}\n{"execute": "quit", "id": 2}\n')
    d.proc.stdin.flush()
    assert json.loads(out.readline()) == {"return": {}, "id": 1}
    assert json.loads(out.readline()) == {"return": {}, "id": 2}
    assert d.proc.wait(DEADLINE) == 0
    assert not os.path.exists(d.pidfile)


def case_client_mode_chardev_reconnects(binary, tmp):
    path = os.path.join(tmp, "listener.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)
    srv.settimeout(DEADLINE)
    d = Daemon(binary, ["--chardev", f"socket,id=c0,path={path},reconnect-ms=50", "--monitor", "c0"], tmp)
    try:
        conn, _ = srv.accept()
        c = Client(conn)
        c.negotiate()
        c.close()
        conn2, _ = srv.accept()  # blockd dials again after the peer went away
        c2 = Client(conn2)
        assert "QMP" in c2.line()
        c2.close()
    finally:
        assert d.stop() == 0
        srv.close()


def case_iothread_objects(binary, tmp):
    args, path = monitor_args(tmp)
    d = Daemon(binary, args + ["--object", "iothread,id=io0,poll-max-ns=0"], tmp)
    try:
        assert "io:io0" in thread_names(d.proc.pid)
        c = Client.unix(path)
        c.negotiate()
        assert c.cmd("object-add", {"qom-type": "iothread", "id": "io1", "poll-max-ns": 1000, "poll-grow": 2,
                                    "poll-shrink": 2, "aio-max-batch": 16, "thread-pool-min": 1,
                                    "thread-pool-max": 4}) == {"return": {}}
        assert "io:io1" in thread_names(d.proc.pid)
        r = c.cmd("object-add", {"qom-type": "iothread", "id": "io1"})
        assert r["error"]["desc"] == "attempt to add duplicate property 'io1' to object (type 'container')", r
        assert c.cmd("object-del", {"id": "io1"}) == {"return": {}}
        assert "io:io1" not in thread_names(d.proc.pid)
        r = c.cmd("object-del", {"id": "io1"})
        assert r["error"]["desc"] == "object 'io1' not found", r
        assert c.cmd("object-add", {"qom-type": "main-loop", "id": "ml"}) == {"return": {}}
        r = c.cmd("object-add", {"qom-type": "main-loop", "id": "ml2"})
        assert r["error"]["desc"] == "only one main-loop instance allowed", r
        r = c.cmd("object-del", {"id": "ml"})
        assert r["error"]["desc"] == "object 'ml' is in use, can not be deleted", r
        r = c.cmd("object-add", {"qom-type": "iothread", "id": "bad", "thread-pool-min": 5, "thread-pool-max": 2})
        assert r["error"]["desc"] == "bad thread-pool-min/thread-pool-max values", r
    finally:
        assert d.stop() == 0


def case_poll_backend_serves_qmp(binary, tmp):
    args, path = monitor_args(tmp)
    d = Daemon(binary, args, tmp, env={"BLOCKD_REACTOR": "poll"})
    try:
        c = Client.unix(path)
        c.negotiate()
        for i in range(50):
            assert c.cmd("query-version", id=i)["id"] == i
        c.send('{"execute": "query-version", "id": "a"}{"execute": "query-version", "id": "b"}')
        assert c.line()["id"] == "a" and c.line()["id"] == "b"
    finally:
        assert d.stop() == 0


def case_stuck_client_does_not_stall_others(binary, tmp):
    a1, p1 = monitor_args(tmp, "m1")
    a2, p2 = monitor_args(tmp, "m2")
    d = Daemon(binary, a1 + a2, tmp)
    try:
        slow = Client.unix(p1)
        slow.negotiate()
        slow.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        # Ask for large replies and never read them.
        slow.send('{"execute": "query-qmp-schema"}' * 64)
        fast = Client.unix(p2)
        fast.negotiate()
        for i in range(20):
            assert fast.cmd("query-version", id=i)["id"] == i
        slow.close()
    finally:
        assert d.stop() == 0


def case_garbage_keeps_serving(binary, tmp):
    args, path = monitor_args(tmp)
    d = Daemon(binary, args, tmp)
    try:
        c = Client.unix(path)
        c.negotiate()
        junk = bytes(range(256)) * 64 + b"]]]}}}{{{" + b"\x01"
        c.send(junk)
        c.send('{"execute": "query-version", "id": "after"}')
        while True:
            m = c.line()
            if m.get("id") == "after":
                assert "return" in m
                break
            assert m["error"]["class"] == "GenericError", m
        c.close()  # one client at a time: the next ones wait in the backlog until this one leaves
        # Abrupt disconnects in the middle of a value leave the daemon serving the next client.
        for _ in range(5):
            x = Client.unix(path)
            x.line()
            x.send('{"execute": "query-ver')
            x.close()
        c2 = Client.unix(path)
        c2.negotiate()
    finally:
        assert d.stop() == 0


def case_oob_reply_overtakes_queued_in_band_replies(binary, tmp):
    args, path = monitor_args(tmp)
    d = Daemon(binary, args, tmp)
    try:
        c = Client.unix(path)
        c.line()
        assert c.cmd("qmp_capabilities", {"enable": ["oob"]}) == {"return": {}}
        # All in one write: the out-of-band error is answered while the in-band requests wait.
        c.send('{"execute": "query-qmp-schema", "id": 1}{"execute": "query-qmp-schema", "id": 2}'
               '{"execute": "query-qmp-schema", "id": 3}{"exec-oob": "query-version", "id": "oob"}')
        ids = [c.line()["id"] for _ in range(4)]
        assert ids == ["oob", 1, 2, 3], ids
    finally:
        assert d.stop() == 0


def case_signals_exit_zero_and_cleanup(binary, tmp):
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        args, path = monitor_args(tmp, "s%d" % sig)
        d = Daemon(binary, args, tmp)
        assert os.path.exists(path)
        assert d.stop(sig) == 0, sig
        assert not os.path.exists(d.pidfile)
        assert not os.path.exists(path), "monitor socket left behind"


CASES = [v for k, v in sorted(globals().items()) if k.startswith("case_")]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--blockd", required=True)
    ap.add_argument("-k", default="")
    a = ap.parse_args()
    passed = failed = 0
    for case in CASES:
        if a.k not in case.__name__:
            continue
        base = "/dev/shm" if os.path.isdir("/dev/shm") else None
        with tempfile.TemporaryDirectory(prefix="blockd-it-", dir=base) as tmp:
            try:
                case(a.blockd, tmp)
                passed += 1
                print("PASS", case.__name__, flush=True)
            except Exception:
                failed += 1
                print("FAIL", case.__name__, flush=True)
                traceback.print_exc()
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
