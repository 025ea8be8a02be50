"""``tandem bench`` end to end against a stand-in OpenAI server with known token timestamps:
the measured metrics equal the scheduled ones (to the machine's scheduling slack), goodput
counts exactly the requests within the SLO, and the JSON and PNG are written."""

from __future__ import annotations

import json

import pytest
from standin_server import Schedule, StandInServer

from coordinator.cli import main as tandem

SLACK_S = 0.06  # a loaded 2-core machine may wake a sleeper this late; margins below are wider
SCHEDULES = [
    Schedule(0.05, (0.02,) * 4),  # TTFT 50 ms, TPOT 20 ms: within ttft_ms=150, tpot_ms=70
    Schedule(0.30, (0.02,) * 4),  # TTFT over
    Schedule(0.05, (0.15,) * 4),  # TPOT over
    Schedule(0.05, ()),  # one token: TPOT 0 for goodput, so within
]


def test_bench_metrics_match_known_timestamps(tmp_path):
    out = tmp_path / "run.json"
    with StandInServer(SCHEDULES) as server:
        code = tandem(["bench", "--url", server.url, "--concurrency", "1", "--num-requests",
                       "4", "--input-len", "12", "--output-len", "5", "--warmup", "0",
                       "--slo", "ttft_ms=150,tpot_ms=70", "--out", str(out)])  # fmt: skip
    assert code == 0
    # the body vLLM's client sends: streamed, usage asked for, exact output length
    body = server.bodies[0]
    assert body["model"] == "stand-in" and len(body["prompt"]) == 12
    assert (body["max_tokens"], body["ignore_eos"], body["stream"]) == (5, True, True)
    assert body["stream_options"] == {"include_usage": True}

    results = json.loads(out.read_text())
    (run,) = results["runs"]
    rows, m = run["requests"], run["metrics"]
    assert [r["output_tokens"] for r in rows] == [s.num_tokens for s in SCHEDULES]
    for row, s in zip(rows, SCHEDULES, strict=True):  # concurrency 1: sent in schedule order
        assert s.ttft_s <= row["ttft_ms"] / 1000 <= s.ttft_s + SLACK_S
        tpot = sum(s.gaps_s) / len(s.gaps_s) if s.gaps_s else 0.0
        # TPOT = (E2E - TTFT) / (n - 1): a late first chunk makes it shorter, so both ways
        assert abs(row["tpot_ms"] / 1000 - tpot) <= SLACK_S
        e2e = s.ttft_s + sum(s.gaps_s)
        assert e2e <= row["e2e_ms"] / 1000 <= e2e + 2 * SLACK_S
    assert (m["completed"], m["failed"], m["good_requests"]) == (4, 0, 2)
    assert m["request_goodput"] == pytest.approx(2 / m["duration_s"])
    assert m["request_throughput"] == pytest.approx(4 / m["duration_s"])
    assert m["total_output_tokens"] == 16 and m["total_input_tokens"] == 4 * 12
    assert m["output_throughput"] == pytest.approx(16 / m["duration_s"])
    # ITL: 8 gaps of 20 ms and 4 of 150 ms; TTFT [50, 300, 50, 50]
    assert 20 <= m["itl_ms"]["median"] <= 20 + 1000 * SLACK_S
    assert 150 <= m["itl_ms"]["p99"] <= 150 + 1000 * SLACK_S
    assert 292.5 <= m["ttft_ms"]["p99"] <= 292.5 + 1000 * SLACK_S  # 50 + 0.97 * 250
    assert results["slo"] == {"ttft_ms": 150.0, "tpot_ms": 70.0}
    assert run["load"] == {"rate": None, "burstiness": 1.0, "concurrency": 1}
    png = out.with_suffix(".png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 20_000


def test_bench_chat_skips_the_role_chunk_and_counts_chunks_without_usage(tmp_path):
    out = tmp_path / "chat.json"
    schedules = [Schedule(0.1, (0.01, 0.01))]
    with StandInServer(schedules, send_usage=False) as server:
        code = tandem(["bench", "--url", server.url, "--workload", "chat", "--system-len", "40",
                       "--user-len", "6", "--turns", "2", "--output-len", "3", "--num-requests",
                       "4", "--rates", "inf", "--warmup", "1", "--no-plot", "--no-progress",
                       "--out", str(out)])  # fmt: skip
    assert code == 0
    (run,) = json.loads(out.read_text())["runs"]
    assert [r["output_tokens"] for r in run["requests"]] == [3] * 4  # token chunks, no usage
    assert all(r["ttft_ms"] >= 100 for r in run["requests"])  # not the role chunk's time
    chats = [b for b in server.bodies if "messages" in b]  # the warm-up is a plain completion
    assert len(chats) == 4 and len(server.bodies) == 5
    assert {b["messages"][0]["content"] for b in chats} == {chats[0]["messages"][0]["content"]}
    assert not out.with_suffix(".png").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--url", "http://10.0.0.1:8000"], "only loopback"),
        (["--url", "http://127.0.0.1:1", "--slo", "ttft=1"], "--slo"),
        (["--url", "http://127.0.0.1:1", "--rates", "0"], "rates must be > 0"),
        (["--url", "http://127.0.0.1:1", "--num-requests", "0"], "--num-requests"),
        (["--compare", "configs/local.yaml", "UNEQUAL"], "equal total CPUs"),
    ],
)
def test_bench_refuses_bad_arguments(tmp_path, capsys, args, message):
    unequal = tmp_path / "one-cpu.yaml"
    text = open("configs/colocated.yaml").read().replace("num_cpus: 2", "num_cpus: 1")
    unequal.write_text(text)
    args = [str(unequal) if a == "UNEQUAL" else a for a in args]
    assert tandem(["bench", *args, "--out", str(tmp_path / "x.json")]) == 2
    assert message in capsys.readouterr().err


def test_each_load_point_sends_new_prompts_the_same_for_every_target(tmp_path):
    prompts = []
    for run in range(2):  # two targets of a comparison see the same requests
        with StandInServer([Schedule(0.0, ())]) as server:
            args = ["bench", "--url", server.url, "--rates", "inf,inf", "--num-requests", "3",
                    "--input-len", "8", "--output-len", "1", "--warmup", "0", "--no-plot",
                    "--no-progress", "--out", str(tmp_path / f"{run}.json")]  # fmt: skip
            assert tandem(args) == 0
        # rate inf: the 3 of a load point arrive in any order; load points run one after another
        sent = [tuple(b["prompt"]) for b in server.bodies]
        prompts.append((set(sent[:3]), set(sent[3:])))
    first, second = prompts
    assert first == second and len(first[0]) == len(first[1]) == 3
    assert not first[0] & first[1]


def test_bench_reports_an_unreachable_server(tmp_path, capsys):
    with StandInServer([Schedule(0.0, ())]) as server:
        url = server.url
    out = tmp_path / "none.json"  # the server is gone: connection refused
    assert tandem(["bench", "--url", url, "--no-progress", "--out", str(out)]) == 1
    assert "tandem bench: " in capsys.readouterr().err
    assert json.loads(out.read_text())["runs"] == []
