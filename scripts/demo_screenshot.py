"""Serve the demo page (hub_card/app.py) on localhost and save what headless Chromium shows of it.

    python scripts/demo_screenshot.py --model runs/waveclip-offline --output docs/figures/demo_page.png

Needs the `demo` extra and Debian's Chromium (`apt install chromium`). The page answers its first example when it
opens; the screenshot waits (in real time, through Chromium's DevTools protocol) until that answer is on the page, so
it shows a real answer of the model: each stage's view, its top answers and the cost.
"""

import argparse
import base64
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path


APP = Path(__file__).resolve().parents[1] / "hub_card" / "app.py"
# As root on a machine with a closed network: no sandbox, no background connections (refused here, and slow).
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]


def load_app():
    spec = importlib.util.spec_from_file_location("waveclip_demo_app", APP)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    """A localhost port nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def chromium_binary() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        raise FileNotFoundError("Headless Chromium is needed for the screenshot: `apt install chromium` (Debian).")
    return found


class DevToolsPipe:
    """Chromium's DevTools protocol over `--remote-debugging-pipe` (JSON messages ended by NUL on fds 3 and 4), so
    no websocket client is needed."""

    def __init__(self, process: subprocess.Popen, commands: int, events: int):
        self.process, self.commands, self.events = process, commands, events
        self.buffer, self.next_id = b"", 0

    def call(self, method: str, session: str | None = None, **params) -> dict:
        """Send one command and return its result, skipping the events that arrive before it."""
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params}
        if session is not None:
            message["sessionId"] = session
        os.write(self.commands, json.dumps(message).encode() + b"\0")
        while True:
            while b"\0" not in self.buffer:
                chunk = os.read(self.events, 1 << 20)
                if not chunk:
                    raise RuntimeError(f"Chromium closed its DevTools pipe while answering {method}.")
                self.buffer += chunk
            raw, self.buffer = self.buffer.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"Chromium refused {method}: {reply['error']}")
                return reply["result"]


def screenshot(
    url: str, output: Path, width: int = 1280, height: int = 1000, wait_for: str = "answered by", timeout: float = 120
) -> Path:
    """`output`: a PNG of `url` as headless Chromium shows it once the page's text contains `wait_for` (the demo
    writes "answered by" when its first answer arrives), waiting at most `timeout` seconds of real time."""
    output.parent.mkdir(parents=True, exist_ok=True)
    to_chromium, commands = os.pipe()
    events, from_chromium = os.pipe()

    def give_chromium_the_pipe():  # DevTools reads fd 3 and writes fd 4
        os.dup2(to_chromium, 3)
        os.dup2(from_chromium, 4)

    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as profile:
        process = subprocess.Popen(
            [
                chromium_binary(),
                *CHROMIUM_FLAGS,
                "--remote-debugging-pipe",
                f"--user-data-dir={profile}",
                f"--window-size={width},{height}",
                "about:blank",
            ],
            preexec_fn=give_chromium_the_pipe,
            start_new_session=True,  # its own process group: stopping it stops its renderers too
            pass_fds=(3, 4),  # kept open in the child after the dup2 above (subprocess closes the rest)
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_chromium)
        os.close(from_chromium)
        try:
            devtools = DevToolsPipe(process, commands, events)
            target = devtools.call("Target.createTarget", url=url)["targetId"]
            session = devtools.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
            devtools.call(
                "Emulation.setDeviceMetricsOverride",
                session,
                width=width,
                height=height,
                deviceScaleFactor=1,
                mobile=False,
            )
            deadline = time.monotonic() + timeout
            while wait_for not in page_text(devtools, session):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"The page at {url} did not show {wait_for!r} within {timeout:.0f} s.")
                time.sleep(0.5)
            time.sleep(1.0)  # let the images and bars that came with the answer finish drawing
            picture = devtools.call("Page.captureScreenshot", session, format="png")["data"]
            output.write_bytes(base64.b64decode(picture))
        finally:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            os.close(commands)
            os.close(events)
    return output


def page_text(devtools: DevToolsPipe, session: str) -> str:
    """What a reader sees on the page now (its body's innerText; empty while it loads)."""
    result = devtools.call(
        "Runtime.evaluate", session, expression="document.body ? document.body.innerText : ''", returnByValue=True
    )
    return result["result"].get("value", "")


def serve_and_screenshot(model: str, output: Path, **kwargs) -> Path:
    """Serve the demo of `model` on a free localhost port, screenshot it, stop the server."""
    port = free_port()
    demo = load_app().build_demo(model)
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        return screenshot(f"http://127.0.0.1:{port}/", output, **kwargs)
    finally:
        demo.close()


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="runs/waveclip-offline", help="a saved WaveCLIP folder or Hub id")
    parser.add_argument("--output", type=Path, default=Path("docs/figures/demo_page.png"))
    args = parser.parse_args(argv)
    path = serve_and_screenshot(args.model, args.output)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
