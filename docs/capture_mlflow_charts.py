"""Screenshot the MLflow UI's views of the rollup runs for the docs.

    python docs/capture_mlflow_charts.py --mlflow-url http://127.0.0.1:5000 \
        --experiment agent-rollups --out docs/mlflow-rollups.png

    python docs/capture_mlflow_charts.py --mlflow-url http://127.0.0.1:5000 \
        --experiment agent-rollups --view runs-by-day-cost --out docs/mlflow-runs-day-cost.png

Drives headless Chromium (Debian's `chromium` package) over the Chrome DevTools Protocol with
the `websockets` package. `--view charts` (the default) opens the experiment's runs in chart
view, switches the x-axis to wall time (the window end) and keeps the latency and token charts.
`--view runs-by-day-cost` opens the runs table of one UTC day (`--day`, default: the day of
the newest run) sorted by `day/cost_usd`, most expensive first, with the day-so-far columns.
Needs an MLflow server whose UI works (its GraphQL endpoint needs graphene 3).
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
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import websockets
from mlflow.tracking import MlflowClient

CHARTS = "latency_p50_ms|latency_p95_ms|latency_p99_ms|tokens_prompt|tokens_completion|tokens_total"
CHARTS_SIZE = (1700, 1010)

SORT_METRIC = "day/cost_usd"
# The runs table's day-so-far columns, in this order, and their widths in pixels: wide enough
# that MLflow does not cut the values (it prints every digit of a float).
DAY_COLUMNS = {
    SORT_METRIC: 130,
    "day/spans": 100,
    "day/errors": 90,
    "day/error_rate": 175,
    "day/latency_p95_ms": 170,
    "day/llm_calls": 100,
    "day/tokens_total": 120,
}
RUN_NAME_COLUMN = "attributes.`Run Name`"
# Twelve runs (eleven agents and "all agents") and the table's footer, no empty space below;
# narrower, the toolbar wraps onto a second line and pushes the last run out of sight.
TABLE_SIZE = (1800, 680)

VIEWS = ("charts", "runs-by-day-cost")
DEFAULT_OUT = {
    "charts": "docs/mlflow-rollups.png",
    "runs-by-day-cost": "docs/mlflow-runs-day-cost.png",
}


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

    async def wait_for(self, expression: str, timeout_s: float, what: str) -> Any:
        """Poll until the JS expression is truthy (the UI loads at the machine's pace)."""
        deadline = time.monotonic() + timeout_s
        while True:
            value = await self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out after {timeout_s:.0f}s waiting for {what}")
            await asyncio.sleep(1)

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

    async def screenshot(self, out: str) -> None:
        shot = await self.call("Page.captureScreenshot", format="png")
        with open(out, "wb") as file:
            file.write(base64.b64decode(shot["data"]))


@asynccontextmanager
async def browser_page(debug_port: int, size: tuple[int, int]) -> AsyncIterator[Page]:
    """A blank page of a headless Chromium with a fresh profile, stopped on exit."""
    width, height = size
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
            f"--window-size={width},{height}",
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
                width=width,
                height=height,
                deviceScaleFactor=1,
                mobile=False,
            )
            await page.call("Page.enable")
            yield page
    finally:
        browser.terminate()
        browser.wait()
        shutil.rmtree(profile, ignore_errors=True)


async def capture_charts(url: str, out: str, debug_port: int) -> None:
    async with browser_page(debug_port, CHARTS_SIZE) as page:
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
        await page.click("document.querySelector('input[placeholder=\"Search metric charts\"]')")
        await page.call("Input.insertText", text=CHARTS)
        await asyncio.sleep(40)  # each chart fetches its runs' histories
        await page.screenshot(out)


def metric_column(metric: str) -> str:
    """The runs table's column id of a metric, as MLflow's UI spells it."""
    return f"metrics.`{metric}`"


def table_layout_script(experiment_id: str) -> str:
    """JS that sets the runs table's columns in the UI state MLflow keeps in localStorage.

    The URL carries only the search (filter, order); the columns shown, their order and widths
    live in the state of the experiment page, under a key like
    ``MLflowLocalStorage-1.1-ExperimentPage-["<id>"]-ReactComponentState`` that the UI writes
    on its first load: found by its ending so that another prefix version still matches."""
    selected = [metric_column(metric) for metric in DAY_COLUMNS]
    widths = {metric_column(metric): width for metric, width in DAY_COLUMNS.items()}
    key_end = json.dumps(f'-ExperimentPage-["{experiment_id}"]-ReactComponentState')
    return f"""(() => {{
        const key = Object.keys(localStorage).find(k => k.endsWith({key_end}));
        if (!key) return false;
        const state = JSON.parse(localStorage.getItem(key));
        state.selectedColumns = {json.dumps(selected)};
        // ag-grid's ids: the checkbox column, the run name, "Created"; "Duration" (empty for
        // these runs, and not one MLflow lets hide) goes last.
        state.columnOrder = ["1", "{RUN_NAME_COLUMN}", "runDateAndNestInfo",
            ...state.selectedColumns, "duration"];
        state.columnWidths = {json.dumps(widths)};
        localStorage.setItem(key, JSON.stringify(state));
        // The assistant panel opens on a first visit and takes a third of the width.
        localStorage.setItem("mlflow.assistant.panelOpen_v1", "false");
        return true;
    }})()"""


async def capture_runs_by_day_cost(url: str, experiment_id: str, out: str, debug_port: int) -> None:
    sorted_column = json.dumps(metric_column(SORT_METRIC))
    header = f"document.querySelector('.ag-header-cell[col-id=\"' + {sorted_column} + '\"]')"
    async with browser_page(debug_port, TABLE_SIZE) as page:
        await page.call("Page.navigate", url=url)
        await page.wait_for(
            table_layout_script(experiment_id), timeout_s=90, what="the experiment page's state"
        )
        await page.call("Page.reload")
        await page.wait_for(
            f"{header} && document.querySelectorAll('.ag-center-cols-container .ag-row').length",
            timeout_s=90,
            what=f"the runs table with a {SORT_METRIC} column",
        )
        await asyncio.sleep(3)  # the rows' cells and colours render after the rows
        await page.screenshot(out)


def newest_day(client: MlflowClient, experiment_id: str) -> str:
    """The UTC day (the runs' ``day`` tag) of the most recently started run."""
    runs = client.search_runs(
        [experiment_id], order_by=["attributes.start_time DESC"], max_results=100
    )
    days = [run.data.tags["day"] for run in runs if "day" in run.data.tags]
    if not days:
        raise SystemExit("no run with a `day` tag: has a worker written rollups yet?")
    return days[0]


def runs_url(mlflow_url: str, experiment_id: str, search: dict[str, str]) -> str:
    query = urllib.parse.urlencode({"workflowType": "machine_learning", **search})
    return f"{mlflow_url}/#/experiments/{experiment_id}/runs?{query}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mlflow-url", default="http://127.0.0.1:5000")
    parser.add_argument("--experiment", default="agent-rollups")
    parser.add_argument("--view", choices=VIEWS, default="charts")
    parser.add_argument("--day", help="runs-by-day-cost: UTC day YYYY-MM-DD [newest run's day]")
    parser.add_argument(
        "--out",
        help="PNG to write [docs/mlflow-rollups.png for charts, "
        "docs/mlflow-runs-day-cost.png for runs-by-day-cost]",
    )
    parser.add_argument("--debug-port", type=int, default=9222)
    args = parser.parse_args()
    client = MlflowClient(args.mlflow_url)
    experiment = client.get_experiment_by_name(args.experiment)
    if experiment is None:
        raise SystemExit(f"no experiment {args.experiment!r} at {args.mlflow_url}")
    experiment_id = experiment.experiment_id
    out = args.out or DEFAULT_OUT[args.view]
    if args.view == "charts":
        url = runs_url(args.mlflow_url, experiment_id, {"compareRunsMode": "CHART"})
        asyncio.run(capture_charts(url, out, args.debug_port))
    else:
        day = args.day or newest_day(client, experiment_id)
        search = {
            # Runs of other days would mix in: each day has its own run per agent.
            "searchFilter": f"tags.day = '{day}'",
            "orderByKey": metric_column(SORT_METRIC),
            "orderByAsc": "false",
            "compareRunsMode": "TABLE",
        }
        url = runs_url(args.mlflow_url, experiment_id, search)
        asyncio.run(capture_runs_by_day_cost(url, experiment_id, out, args.debug_port))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
