"""The status page in a real headless Chromium.

1. Over the engine double (no Ray): it renders every pool, worker and trace phase the JSON
   holds, the waterfall bars sit where the phases are, and with an API key it asks for the key,
   keeps it for the tab and sends it.
2. Over a real ``tandem serve`` (configs/local.yaml, started by ``bench.tandem_server``, as
   ``tandem bench --config`` does): every pool and worker shows, and its numbers move while
   ``tandem bench --url`` loads the server, and its waterfall shows the requests' real traces;
   the bench's JSON is right. Screenshots (one while
   requests are in flight, one after) go to the test's tmp dir.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys

import pytest
import requests
from chromium_page import chromium_page
from server_process import ROOT

from bench.tandem_server import TandemServer
from coordinator.engine_client import EngineStats, PoolStats, TransferStats, WorkerStatus
from coordinator.server import bound_port, build_app, start_server
from coordinator.trace import TracePhase, TraceSummary

sys.path.insert(0, str(ROOT / "tests" / "coordinator"))
from engine_double import ScriptedEngine  # noqa: E402
from serving_harness import make_config  # noqa: E402
from tokenizer_double import ByteTokenizer  # noqa: E402

WORKERS = (
    WorkerStatus("prefill-0", "prefill", True, 0, 1, 2, 10, 256),
    WorkerStatus("decode-0", "decode", True, 0, 5, 0, 512, 1024),
    WorkerStatus("decode-1", "decode", False, 2, 0, 0, 0, 1024),
)
PHASES = ("queue", "reserve", "prefill", "transfer", "decode")
TRACES = [
    TraceSummary(
        f"cmpl-{i:04d}",
        tuple(TracePhase(name, 0.1 * i + 0.2 * j, 0.1 * i + 0.2 * (j + 1))
              for j, name in enumerate(PHASES)),  # fmt: skip
        retries=int(i == 1),
        migrations=int(i == 2),
        finish_reason="length",
    )
    for i in range(4)
]  # the last one ends at 0.3 + 1.0 = 1.3 s: the waterfall's span


async def _text(page, selector: str) -> str:
    return (await page.locator(selector).inner_text()).strip()


async def _cells(page, rows: str) -> list[list[str]]:
    """The text of each cell of each row, read cell by cell (a row's own innerText joins its
    cells with tabs only once the table is laid out)."""
    return [[(await c.inner_text()).strip() for c in await r.locator("td").all()]
            for r in await page.locator(rows).all()]  # fmt: skip


async def _rendered(page, count: int) -> None:
    await page.wait_for_function(f"Number(document.body.dataset.renders) >= {count}")


def test_page_renders_workers_pools_and_waterfall(tmp_path):
    engine = ScriptedEngine(snapshot=EngineStats(
        pools=(PoolStats("prefill", 10, 256, 1, 2), PoolStats("decode", 512, 2048, 5, 0)),
        transfers=(TransferStats("nixl", 3_000_000, 0.5),), num_running=5, num_waiting=2,
        workers=WORKERS))  # fmt: skip
    errors: list[str] = []

    async def main():
        app = build_app(make_config(), engine, ByteTokenizer(), recent_traces=lambda: TRACES)
        runner = await start_server(app, "127.0.0.1", 0)
        url = f"http://127.0.0.1:{bound_port(runner)}"
        try:
            async with chromium_page(tmp_path / "profile", errors) as page:
                await page.goto(f"{url}/status?interval=200")
                await _rendered(page, 1)
                rows = await _cells(page, "#workers tbody tr")
                pools = await _cells(page, "#pools tbody tr")
                bars = await page.locator("#waterfall .bar").evaluate_all(
                    "bars => bars.map(b => [b.closest('.wf-row').dataset.request,"
                    " b.dataset.phase, b.style.left, b.style.width])")
                legend = await page.locator("#legend span").all_inner_texts()
                labels = await page.locator("#waterfall .wf-label").all_inner_texts()
                cards = {k: await _text(page, f"#{k}") for k in ("in-flight", "run-wait",
                                                                  "kv-total")}  # fmt: skip
                empty_hidden = await page.locator("#waterfall-empty").is_hidden()
                await page.screenshot(path=tmp_path / "status-double.png", full_page=True)
        finally:
            await runner.cleanup()
        return rows, pools, bars, legend, labels, cards, empty_hidden

    rows, pools, bars, legend, labels, cards, empty_hidden = asyncio.run(main())
    assert errors == []
    assert rows == [
        ["prefill-0", "prefill", "live", "0", "1", "2", "10 / 256"],
        ["decode-0", "decode", "live", "0", "5", "0", "512 / 1024"],
        ["decode-1", "decode", "dead", "2", "0", "0", "0 / 1024"],
    ]
    assert [p[:2] for p in pools] == [["prefill", "1 / 1"], ["decode", "1 / 2"]]
    assert legend == list(PHASES) and empty_hidden
    assert len(bars) == len(TRACES) * len(PHASES)
    span = 1.3
    for (rid, name, left, width), (trace, phase) in zip(
        bars, [(t, p) for t in TRACES for p in t.phases], strict=True
    ):
        assert (rid, name) == (trace.request_id, phase.name)
        assert float(left.rstrip("%")) == pytest.approx(100 * phase.start_s / span, abs=1e-3)
        width_pct = 100 * (phase.end_s - phase.start_s) / span
        assert float(width.rstrip("%")) == pytest.approx(width_pct, abs=1e-3)
    assert "1 retry" in labels[1] and "1 migr." in labels[2] and "length" in labels[0]
    assert cards == {"in-flight": "0", "run-wait": "5 running, 2 waiting",
                     "kv-total": "3.0 MB in 0.50 s (nixl)"}  # fmt: skip


def test_page_asks_for_the_api_key_and_sends_it(tmp_path):
    errors: list[str] = []

    async def main():
        app = build_app(make_config(api_key="sekret"), ScriptedEngine(), ByteTokenizer())
        runner = await start_server(app, "127.0.0.1", 0)
        url = f"http://127.0.0.1:{bound_port(runner)}"
        try:
            async with chromium_page(tmp_path / "profile", errors) as page:
                await page.goto(f"{url}/?interval=200")
                await page.locator("#key-form").wait_for(state="visible")
                asked = (await page.evaluate("document.body.dataset.renders"), list(errors))
                await page.fill("#key-input", "wrong")
                await page.click("#key-form button")
                await page.wait_for_function("document.querySelector('#key-msg')"
                                             ".textContent.includes('refused')")  # fmt: skip
                refused = list(errors)
                errors.clear()
                await page.fill("#key-input", "sekret")
                await page.click("#key-form button")
                await _rendered(page, 2)
                stored = await page.evaluate("sessionStorage.getItem('tandem.apiKey')")
                model = await _text(page, "#model")
                form_hidden = await page.locator("#key-form").is_hidden()
        finally:
            await runner.cleanup()
        return asked, refused, stored, model, form_hidden

    asked, refused, stored, model, form_hidden = asyncio.run(main())
    assert asked == ("0", [])  # asked before any request: no 401 on the console
    assert len(refused) == 1 and "401" in refused[0]  # the browser logs the refused fetch
    assert (stored, model, form_hidden) == ("sekret", "tiny-test-model", True)
    assert errors == []


async def _sample(page) -> dict:
    return await page.evaluate("""() => ({
        renders: Number(document.body.dataset.renders),
        inFlight: Number(document.querySelector('#in-flight').textContent),
        ttftCount: document.querySelector('#ttft-count').textContent,
        admitted: document.querySelector('#admitted-rate').textContent,
        workers: [...document.querySelectorAll('#workers tbody tr')].map(tr => [
            tr.dataset.worker, tr.querySelector('.live').textContent,
            Number(tr.querySelector('.running').textContent),
            tr.querySelector('.kv-text').textContent]),
        pools: [...document.querySelectorAll('#pools tbody tr')].map(tr => tr.dataset.pool),
        traces: [...document.querySelectorAll('#waterfall .wf-row')].map(row => [
            row.dataset.request,
            [...row.querySelectorAll('.bar')].map(bar => bar.dataset.phase)]),
    })""")


@pytest.mark.slow
@pytest.mark.e2e
def test_live_page_moves_while_tandem_bench_loads_the_server(tmp_path):
    errors: list[str] = []
    out = tmp_path / "bench.json"
    server = TandemServer("configs/local.yaml", tmp_path / "server.log", num_cpus=2)
    try:
        url = server.wait_ready(300)

        async def main():
            async with chromium_page(tmp_path / "profile", errors) as page:
                await page.goto(f"{url}/?interval=250")
                await _rendered(page, 1)
                before = await _sample(page)
                bench = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "coordinator.cli", "bench", "--url", url,
                    "--input-len", "48", "--output-len", "16", "--num-requests", "6",
                    "--rates", "4", "--slo", "ttft_ms=60000,tpot_ms=60000", "--no-progress",
                    "--no-plot", "--out", str(out), cwd=ROOT, stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.STDOUT)  # fmt: skip
                during = []
                while bench.returncode is None:
                    during.append(await _sample(page))
                    if during[-1]["inFlight"] and not (tmp_path / "status-live.png").exists():
                        await page.screenshot(path=tmp_path / "status-live.png", full_page=True)
                    try:
                        await asyncio.wait_for(bench.wait(), 0.3)
                    except TimeoutError:
                        pass
                output = (await bench.stdout.read()).decode()
                await page.wait_for_timeout(600)
                after = await _sample(page)
                await page.screenshot(path=tmp_path / "status-after.png", full_page=True)
                return before, during, after, bench.returncode, output

        before, during, after, code, output = asyncio.run(main())
        metrics_text = requests.get(f"{url}/metrics", timeout=10).text
    finally:
        assert server.stop() == 0, server.log_path.read_text()[-3000:]
    assert code == 0, output
    assert errors == []
    # every pool and worker of the topology, live
    assert before["pools"] == ["prefill", "decode"]
    live = sorted((w[0], w[1]) for w in before["workers"])
    assert live == [("decode-0", "live"), ("prefill-0", "live")]
    assert before["ttftCount"] == "(0 samples)" and before["inFlight"] == 0
    # numbers moved while requests ran
    assert max(s["inFlight"] for s in during) > 0
    assert any(w[2] > 0 for s in during for w in s["workers"])  # a worker had a running request
    assert any(w[3].split(" /")[0] != "0" for s in during for w in s["workers"])  # KV in use
    assert after["ttftCount"] == "(8 samples)"  # 2 warm-up + 6 measured requests
    # the waterfall shows the requests' real traces, every phase of the disaggregated path
    assert len(after["traces"]) == 8
    assert all(phases == ["queue", "prefill", "transfer", "decode"]
               for _, phases in after["traces"]), after["traces"]  # fmt: skip
    assert float(after["admitted"]) > 0 and after["renders"] > before["renders"] + 3
    # the bench's own report
    (run,) = json.loads(out.read_text())["runs"]
    m = run["metrics"]
    assert (m["completed"], m["failed"], m["total_output_tokens"]) == (6, 0, 6 * 16)
    assert m["good_requests"] == 6 and m["ttft_ms"]["p99"] > 0 and m["itl_ms"]["median"] > 0
    assert re.search(r"rate 4/s \| 6 ok, 0 failed", output)
    assert (tmp_path / "status-live.png").exists()  # taken while requests were in flight
    # no coordinator.slo in local.yaml: every finished request is goodput
    assert re.search(r"^tandem_goodput_requests_total 8\.0$", metrics_text, re.M)
