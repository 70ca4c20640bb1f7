#!/usr/bin/env python3
"""A qemu-guest-agent client for the VM lab (scripts/vm-lab): the lab's only control channel.

  qga.py SOCK ping [TIMEOUT]            succeeds once the guest agent answers
  qga.py SOCK exec TIMEOUT SCRIPT       bash -c SCRIPT in the guest; its stdout/stderr here, its
                                        exit status as ours (124 and a message on timeout); with a
                                        trailing `-`, our stdin is its stdin (guest-exec input-data)
  qga.py SOCK start SCRIPT              starts bash -c SCRIPT, prints the guest pid
  qga.py SOCK wait PID TIMEOUT          waits for a started process: its output and status
  qga.py SOCK thaw                      guest-fsfreeze-thaw (FITHAW on every mount; the lab's
                                        emergency thaw, never a freeze)

One connection at a time per socket (qemu's chardev serves one client): a lock file next to
the socket serialises callers; long commands use start + wait so they do not hold it.
"""
import base64
import fcntl
import json
import os
import random
import socket
import sys
import time

PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class Qga:
    def __init__(self, path, timeout=10.0):
        self.lock = open(path + ".lock", "a")
        fcntl.flock(self.lock, fcntl.LOCK_EX)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.buf = b""
        self.sync()

    def _read_msg(self):
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("guest agent closed the connection")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        line = line.strip(b"\xff").strip()
        return json.loads(line) if line else None

    def sync(self):
        # Stale replies of an earlier client may be queued: skip until our id comes back.
        ident = random.randrange(1, 2**31)
        self.sock.sendall(b"\xff" + json.dumps({"execute": "guest-sync-delimited", "arguments": {"id": ident}}).encode())
        while True:
            msg = self._read_msg()
            if msg and msg.get("return") == ident:
                return

    def call(self, cmd, **args):
        req = {"execute": cmd}
        if args:
            req["arguments"] = args
        self.sock.sendall(json.dumps(req).encode())
        while True:
            msg = self._read_msg()
            if msg is None:
                continue
            if "error" in msg:
                raise RuntimeError("%s: %s" % (cmd, msg["error"].get("desc", msg["error"])))
            if "return" in msg:
                return msg["return"]

    def close(self):
        self.sock.close()
        self.lock.close()


def start(sock, script, stdin=b""):
    q = Qga(sock)
    args = {"path": "/bin/bash", "arg": ["-c", script], "env": ["PATH=" + PATH, "LANG=C.UTF-8", "HOME=/root"],
            "capture-output": True}
    if stdin:
        args["input-data"] = base64.b64encode(stdin).decode()
    pid = q.call("guest-exec", **args)["pid"]
    q.close()
    return pid


def wait(sock, pid, timeout):
    deadline = time.monotonic() + timeout
    delay = 0.02
    while True:
        q = Qga(sock)
        st = q.call("guest-exec-status", pid=pid)
        q.close()
        if st.get("exited"):
            sys.stdout.buffer.write(base64.b64decode(st.get("out-data", "")))
            sys.stdout.flush()
            sys.stderr.buffer.write(base64.b64decode(st.get("err-data", "")))
            if st.get("out-truncated") or st.get("err-truncated"):
                sys.stderr.write("qga: output truncated\n")
            if "signal" in st:
                sys.stderr.write("qga: guest process killed by signal %d\n" % st["signal"])
                return 128 + st["signal"]
            return st.get("exitcode", 1)
        if time.monotonic() > deadline:
            sys.stderr.write("qga: guest process %d still running after %ss\n" % (pid, timeout))
            return 124
        time.sleep(delay)
        delay = min(delay * 2, 0.25)


def main():
    sock, cmd = sys.argv[1], sys.argv[2]
    if cmd == "ping":
        deadline = time.monotonic() + float(sys.argv[3] if len(sys.argv) > 3 else 0)
        while True:
            try:
                q = Qga(sock, timeout=2)
                q.call("guest-ping")
                q.close()
                return 0
            except (OSError, ConnectionError, ValueError, RuntimeError) as e:
                if time.monotonic() > deadline:
                    sys.stderr.write("qga: no guest agent on %s: %s\n" % (sock, e))
                    return 1
                time.sleep(0.5)
    if cmd == "exec":
        stdin = sys.stdin.buffer.read() if sys.argv[5:6] == ["-"] else b""
        return wait(sock, start(sock, sys.argv[4], stdin), float(sys.argv[3]))
    if cmd == "start":
        print(start(sock, sys.argv[3]))
        return 0
    if cmd == "wait":
        return wait(sock, int(sys.argv[3]), float(sys.argv[4]))
    if cmd == "thaw":
        q = Qga(sock)
        print(q.call("guest-fsfreeze-thaw"))
        q.close()
        return 0
    sys.stderr.write(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main())
