"""A real headless Chromium, driven over the DevTools protocol, for tests of the HTML report.

The browser runs with no network at all (every host resolves to nothing and every request goes
to a closed proxy on loopback), a throw-away profile, and a deadline; the DevTools endpoint is
on 127.0.0.1 only. It is started and stopped by the caller (`with Chromium() as browser:`), in
its own process group, which is killed on the way out, so no renderer or zygote outlives a test.

The stdlib has no WebSocket client and the test environment does not ship one, so the few
lines of RFC 6455 the protocol needs (a masked text frame out, unmasked frames in, ping/pong,
fragments) are written here over a plain socket.

Evaluating script through the protocol is the test's doing: the report itself carries none (its
Content-Security-Policy forbids it, and DevTools evaluation is not subject to the page's CSP).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any

MISSING_REASON = "chromium is not installed: apt-get install chromium"
"""Why the browser tests skip when there is no Chromium (make test installs it)."""

_URL_KEPT = 200

_WEBSOCKET_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

NO_NETWORK_FLAGS: tuple[str, ...] = (
    "--proxy-server=127.0.0.1:9",  # the discard port: nothing listens, every request fails
    "--proxy-bypass-list=<-loopback>",  # loopback goes through that proxy too
    "--host-resolver-rules=MAP * ~NOTFOUND",  # and no name resolves
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-domain-reliability",
    "--no-pings",
)
"""Flags that leave the browser no way to reach any network, so a page that needed one (a CDN
font, a remote image) would visibly fail."""

BASE_FLAGS: tuple[str, ...] = (
    "--headless=new",
    "--no-sandbox",  # tests run as root in a container, where the sandbox cannot start
    "--disable-gpu",
    "--disable-extensions",
    "--no-first-run",
    "--no-default-browser-check",
    "--mute-audio",
    "--hide-scrollbars",
    "--force-device-scale-factor=1",
    "--remote-debugging-address=127.0.0.1",
    "--remote-debugging-port=0",  # any free port; Chromium writes it to DevToolsActivePort
)


def chromium_path() -> str | None:
    """The Chromium executable, or None when it is not installed."""
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return "/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else None


class BrowserError(RuntimeError):
    """The browser failed to start, answered with an error, or ran past its deadline."""


class _WebSocket:
    """A minimal RFC 6455 client: text frames out (masked, as a client must), any frames in."""

    def __init__(self, port: int, path: str, deadline: float) -> None:
        self._deadline = deadline
        self._sock = socket.create_connection(("127.0.0.1", port), timeout=self._remaining())
        key = base64.b64encode(os.urandom(16)).decode("ascii")
        # No Origin header: Chromium accepts DevTools connections that do not claim a web origin.
        request = (
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        self._sock.sendall(request.encode("ascii"))
        self._buffer = bytearray()
        while b"\r\n\r\n" not in self._buffer:
            self._buffer += self._recv_some()
        head, rest = bytes(self._buffer).split(b"\r\n\r\n", 1)
        self._buffer = bytearray(rest)
        lines = head.decode("latin-1").split("\r\n")
        if not lines[0].startswith("HTTP/1.1 101"):
            raise BrowserError(f"DevTools refused the WebSocket: {lines[0]}")
        expected = base64.b64encode(
            hashlib.sha1((key + _WEBSOCKET_GUID).encode("ascii")).digest()
        ).decode("ascii")
        headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines)}
        if headers.get("sec-websocket-accept") != expected:
            raise BrowserError("DevTools answered the WebSocket handshake with a wrong key")

    def _remaining(self) -> float:
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise BrowserError("the browser ran past its deadline")
        return remaining

    def _recv_some(self) -> bytes:
        self._sock.settimeout(self._remaining())
        try:
            chunk = self._sock.recv(1 << 20)
        except TimeoutError as error:
            raise BrowserError("the browser ran past its deadline") from error
        if not chunk:
            raise BrowserError("the browser closed the DevTools connection")
        return chunk

    def _recv_exactly(self, size: int) -> bytes:
        while len(self._buffer) < size:
            self._buffer += self._recv_some()
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        return data

    def _send_frame(self, opcode: int, payload: bytes) -> None:
        header = bytes([0x80 | opcode])
        size = len(payload)
        if size < 126:
            header += bytes([0x80 | size])
        elif size < 1 << 16:
            header += bytes([0x80 | 126]) + struct.pack(">H", size)
        else:
            header += bytes([0x80 | 127]) + struct.pack(">Q", size)
        mask = os.urandom(4)
        masked = bytes(byte ^ mask[index % 4] for index, byte in enumerate(payload))
        self._sock.settimeout(self._remaining())
        self._sock.sendall(header + mask + masked)

    def send_text(self, text: str) -> None:
        self._send_frame(0x1, text.encode("utf-8"))

    def receive_text(self) -> str:
        """The next whole text message (fragments joined; pings answered)."""
        message = b""
        while True:
            first, second = self._recv_exactly(2)
            fin, opcode = first & 0x80, first & 0x0F
            size = second & 0x7F
            if size == 126:
                (size,) = struct.unpack(">H", self._recv_exactly(2))
            elif size == 127:
                (size,) = struct.unpack(">Q", self._recv_exactly(8))
            mask = self._recv_exactly(4) if second & 0x80 else b""
            payload = self._recv_exactly(size)
            if mask:
                payload = bytes(byte ^ mask[index % 4] for index, byte in enumerate(payload))
            if opcode == 0x8:
                raise BrowserError("the browser closed the DevTools connection")
            if opcode == 0x9:
                self._send_frame(0xA, payload)
                continue
            if opcode == 0xA:
                continue
            message += payload
            if fin:
                return message.decode("utf-8")

    def close(self) -> None:
        self._sock.close()


@dataclass
class Tab:
    """One page, attached through a flat DevTools session."""

    browser: Chromium
    session: str
    """The DevTools session id of the page."""
    requests: list[str] = field(default_factory=list)
    """Every URL the page asked for (Network.requestWillBeSent), in order, cut to 200
    characters (a data: image's URL is the whole image)."""
    failed: dict[str, str] = field(default_factory=dict)
    """URL -> why it did not load (Network.loadingFailed: "csp" when the policy refused it,
    or the network error)."""
    request_ids: dict[str, int] = field(default_factory=dict)
    """DevTools request id -> index in `requests`."""
    log: list[dict[str, Any]] = field(default_factory=list)
    """Every browser log entry (Log.entryAdded: CSP violations, failed loads...)."""

    def call(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        return self.browser.call(method, params, session=self.session)

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (returned by value)."""
        answer = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        if "exceptionDetails" in answer:
            raise BrowserError(f"evaluation failed: {answer['exceptionDetails']}")
        return answer["result"].get("value")

    def screenshot(self, *, full_page: bool = False) -> bytes:
        """A PNG of the viewport, or of the whole page."""
        params: dict[str, Any] = {"format": "png"}
        if full_page:
            metrics = self.call("Page.getLayoutMetrics")
            size = metrics["cssContentSize"]
            params["captureBeyondViewport"] = True
            params["clip"] = {
                "x": 0,
                "y": 0,
                "width": size["width"],
                "height": size["height"],
                "scale": 1,
            }
        return base64.b64decode(self.call("Page.captureScreenshot", params)["data"])


class Chromium:
    """A headless Chromium with no network, for as long as the `with` block runs."""

    def __init__(self, binary: str | None = None, *, timeout: float = 60.0) -> None:
        found = binary or chromium_path()
        if found is None:
            raise BrowserError(MISSING_REASON)
        self.binary = found
        self.timeout = timeout
        self._deadline = 0.0
        self._profile: tempfile.TemporaryDirectory[str] | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._stderr: IO[bytes] | None = None
        self._socket: _WebSocket | None = None
        self._next_id = 0
        self._tabs: dict[str, Tab] = {}
        self.process_group: int | None = None
        """The browser's process group (it and every helper process it started)."""

    def __enter__(self) -> Chromium:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def _start(self) -> None:
        self._deadline = time.monotonic() + self.timeout
        self._profile = tempfile.TemporaryDirectory(prefix="wwcli-chromium-")
        profile = Path(self._profile.name)
        self._stderr = open(profile.parent / f"{profile.name}.stderr", "w+b")  # noqa: SIM115
        self._process = subprocess.Popen(
            [
                self.binary,
                *BASE_FLAGS,
                *NO_NETWORK_FLAGS,
                f"--user-data-dir={profile}",
                "about:blank",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self._stderr,
            start_new_session=True,  # its own process group, killed as a whole in close()
        )
        self.process_group = self._process.pid
        active = profile / "DevToolsActivePort"
        while True:
            if self._process.poll() is not None:
                raise BrowserError(
                    f"chromium exited with {self._process.returncode}: {self._stderr_tail()}"
                )
            if active.exists():
                lines = active.read_text().split()
                if len(lines) >= 2:
                    port, path = int(lines[0]), lines[1]
                    break
            if time.monotonic() > self._deadline:
                raise BrowserError(f"chromium did not start: {self._stderr_tail()}")
            time.sleep(0.05)
        self._socket = _WebSocket(port, path, self._deadline)

    def _stderr_tail(self) -> str:
        if self._stderr is None:
            return ""
        self._stderr.seek(0)
        return self._stderr.read().decode("utf-8", "replace")[-2000:]

    def _messages(self) -> Iterator[dict[str, Any]]:
        assert self._socket is not None
        while True:
            message: dict[str, Any] = json.loads(self._socket.receive_text())
            tab = self._tabs.get(message.get("sessionId", ""))
            method = message.get("method")
            if tab is not None and method == "Network.requestWillBeSent":
                params = message["params"]
                tab.requests.append(params["request"]["url"][:_URL_KEPT])
                tab.request_ids[params["requestId"]] = len(tab.requests) - 1
            elif tab is not None and method == "Network.loadingFailed":
                params = message["params"]
                index = tab.request_ids.get(params["requestId"])
                if index is not None:
                    reason = params.get("blockedReason") or params.get("errorText", "failed")
                    tab.failed[tab.requests[index]] = reason
            elif tab is not None and method == "Log.entryAdded":
                tab.log.append(message["params"]["entry"])
            yield message

    def call(
        self, method: str, params: dict[str, Any] | None = None, *, session: str | None = None
    ) -> dict[str, Any]:
        """Send one DevTools command and wait for its answer (events meanwhile are recorded)."""
        assert self._socket is not None, "the browser is not running"
        self._next_id += 1
        command: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session is not None:
            command["sessionId"] = session
        self._socket.send_text(json.dumps(command))
        for message in self._messages():
            if message.get("id") == command["id"]:
                if "error" in message:
                    raise BrowserError(f"{method}: {message['error']}")
                result: dict[str, Any] = message.get("result", {})
                return result
        raise AssertionError("unreachable")

    def _wait_for(self, method: str, session: str, seen: list[dict[str, Any]]) -> None:
        if any(m.get("method") == method and m.get("sessionId") == session for m in seen):
            return
        for message in self._messages():
            if message.get("method") == method and message.get("sessionId") == session:
                return

    def open(self, page: Path, *, width: int = 1200, height: int = 900) -> Tab:
        """A new tab of `width` x `height` CSS pixels showing the file `page`, once its load
        event has fired (so every image has loaded or failed)."""
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})[
            "sessionId"
        ]
        tab = Tab(self, session)
        self._tabs[session] = tab
        for domain in ("Page", "Network", "Log"):
            tab.call(f"{domain}.enable")
        tab.call(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
        )
        # Events that arrive before navigate's answer are collected here, so a fast load event
        # is not missed.
        seen: list[dict[str, Any]] = []
        assert self._socket is not None
        self._next_id += 1
        command_id = self._next_id
        self._socket.send_text(
            json.dumps(
                {
                    "id": command_id,
                    "method": "Page.navigate",
                    "params": {"url": page.resolve().as_uri()},
                    "sessionId": session,
                }
            )
        )
        for message in self._messages():
            seen.append(message)
            if message.get("id") == command_id:
                if "error" in message or message.get("result", {}).get("errorText"):
                    raise BrowserError(f"navigation to {page} failed: {message}")
                break
        self._wait_for("Page.loadEventFired", session, seen)
        return tab

    def close(self) -> None:
        """Stop the browser and every process it started, and remove its profile."""
        if self._socket is not None:
            with contextlib.suppress(BrowserError, OSError):  # it is killed below in any case
                self.call("Browser.close")
            self._socket.close()
            self._socket = None
        if self._process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._process.wait(timeout=5)
            self._kill_group(signal.SIGKILL)
            self._process.wait()
            self._wait_group_gone(timeout=5)
            self._process = None
        if self._stderr is not None:
            self._stderr.close()
            Path(self._stderr.name).unlink(missing_ok=True)
            self._stderr = None
        if self._profile is not None:
            self._profile.cleanup()
            self._profile = None

    def _kill_group(self, signum: int) -> None:
        if self.process_group is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process_group, signum)

    def _wait_group_gone(self, timeout: float) -> None:
        end = time.monotonic() + timeout
        while self.group_alive() and time.monotonic() < end:
            time.sleep(0.05)

    def group_alive(self) -> bool:
        """Whether any process of the browser's group is still running."""
        if self.process_group is None:
            return False
        try:
            os.killpg(self.process_group, 0)
        except ProcessLookupError:
            return False
        return True
