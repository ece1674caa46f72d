"""HTTP over the node's Unix-domain socket (standard library only)."""

import http.client
import json
import socket


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path, timeout):
        super().__init__("node", timeout=timeout)
        self._path = path

    def connect(self):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(self._path)
        self.sock = s


class NodeError(RuntimeError):
    """The node answered with an error (its reason is the message)."""

    def __init__(self, status, reason):
        super().__init__(f"{reason} (HTTP {status})")
        self.status = status
        self.reason = reason


def call(path, method, target, body=None, timeout=3700):
    conn = _UnixConnection(path, timeout)
    try:
        conn.request(method, target, body=body,
                     headers={"Content-Type": "application/octet-stream"})
        r = conn.getresponse()
        data = r.read()
        return r.status, data
    finally:
        conn.close()


def call_json(path, method, target, body=None, timeout=3700):
    status, data = call(path, method, target, body, timeout)
    try:
        value = json.loads(data) if data else {}
    except ValueError:
        value = {"error": data.decode("utf-8", "replace")}
    if status >= 400:
        raise NodeError(status, value.get("error", ""))
    return status, value
