"""Screenshot the MLflow UI's metric charts of the rollup runs (docs/mlflow-rollups.png).

    python docs/capture_mlflow_charts.py --mlflow-url http://127.0.0.1:5000 \
        --experiment agent-rollups --out docs/mlflow-rollups.png

Drives headless Chromium (Debian's `chromium` package) over the Chrome DevTools Protocol with
the `websockets` package: opens the experiment's runs in chart view, switches the x-axis to
wall time (the window end) and keeps the latency and token charts. Needs an MLflow server whose
UI works (its GraphQL endpoint needs graphene 3).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import itertools
import json
import shutil
import subprocess
import tempfile
import time
import urllib.request
from typing import Any

import websockets
from mlflow.tracking import MlflowClient

CHARTS = "latency_p50_ms|latency_p95_ms|latency_p99_ms|tokens_prompt|tokens_completion|tokens_total"
WIDTH, HEIGHT = 1700, 1010


class Page:
    def __init__(self, socket: Any) -> None:
        self._socket = socket
        self._ids = itertools.count(1)

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        request_id = next(self._ids)
        await self._socket.send(json.dumps({"id": request_id, "method": method, "params": params}))
        while True:
            message = json.loads(await self._socket.recv())
            if message.get("id") == request_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                result: dict[str, Any] = message["result"]
                return result

    async def evaluate(self, expression: str) -> Any:
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")

    async def click(self, finder: str) -> None:
        """Click the centre of the element the JS expression ``finder`` returns."""
        box = await self.evaluate(
            f"(() => {{ const e = {finder}; if (!e) return null; "
            "const r = e.getBoundingClientRect(); "
            "return [r.x + r.width / 2, r.y + r.height / 2]; })()"
        )
        if box is None:
            raise RuntimeError(f"nothing to click: {finder}")
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            await self.call(
                "Input.dispatchMouseEvent",
                type=kind,
                x=box[0],
                y=box[1],
                button="left",
                clickCount=1,
            )


async def capture(url: str, out: str, debug_port: int) -> None:
    profile = tempfile.mkdtemp(prefix="chromium-")
    browser = subprocess.Popen(
        [
            shutil.which("chromium") or "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            f"--remote-debugging-port={debug_port}",
            f"--window-size={WIDTH},{HEIGHT}",
            "about:blank",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{debug_port}/json/list") as answer:
                    targets = json.load(answer)
                socket_url = next(t for t in targets if t["type"] == "page")["webSocketDebuggerUrl"]
                break
            except (OSError, StopIteration):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        async with websockets.connect(socket_url, max_size=50_000_000) as socket:
            page = Page(socket)
            await page.call(
                "Emulation.setDeviceMetricsOverride",
                width=WIDTH,
                height=HEIGHT,
                deviceScaleFactor=1,
                mobile=False,
            )
            await page.call("Page.enable")
            await page.call("Page.navigate", url=url)
            await asyncio.sleep(25)  # the UI, the runs, then the first charts
            close_assistant = "document.querySelector('button[aria-label=Close]')"
            if await page.evaluate(f"!!{close_assistant}"):
                await page.click(close_assistant)
            await page.click("document.querySelector('button[aria-label=\"Configure charts\"]')")
            await asyncio.sleep(1.5)
            await page.click(
                "[...document.querySelectorAll('*')].find(e => e.children.length === 0 "
                "&& e.textContent.trim() === 'Time (wall)')"
            )
            await asyncio.sleep(1.5)
            for kind in ("keyDown", "keyUp"):
                await page.call(
                    "Input.dispatchKeyEvent",
                    type=kind,
                    key="Escape",
                    code="Escape",
                    windowsVirtualKeyCode=27,
                )
            await page.click(
                "document.querySelector('input[placeholder=\"Search metric charts\"]')"
            )
            await page.call("Input.insertText", text=CHARTS)
            await asyncio.sleep(40)  # each chart fetches its runs' histories
            shot = await page.call("Page.captureScreenshot", format="png")
            with open(out, "wb") as file:
                file.write(base64.b64decode(shot["data"]))
    finally:
        browser.terminate()
        browser.wait()
        shutil.rmtree(profile, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mlflow-url", default="http://127.0.0.1:5000")
    parser.add_argument("--experiment", default="agent-rollups")
    parser.add_argument("--out", default="docs/mlflow-rollups.png")
    parser.add_argument("--debug-port", type=int, default=9222)
    args = parser.parse_args()
    experiment = MlflowClient(args.mlflow_url).get_experiment_by_name(args.experiment)
    if experiment is None:
        raise SystemExit(f"no experiment {args.experiment!r} at {args.mlflow_url}")
    url = (
        f"{args.mlflow_url}/#/experiments/{experiment.experiment_id}/runs"
        "?workflowType=machine_learning&compareRunsMode=CHART"
    )
    asyncio.run(capture(url, args.out, args.debug_port))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
