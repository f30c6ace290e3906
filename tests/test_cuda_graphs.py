"""CUDA-graph sizes chosen for `vllm serve --enable-zeda` (vllm_zeda.serve.cuda_graphs), against the
installed vLLM's own argument parser and config: the sizes must reach the compilation config
vLLM builds, and a user's choice must win."""
import pytest

from vllm_zeda.serve.cuda_graphs import VLLM_DEFAULT_MAX, capture_sizes, extend_for_mixed_steps


def test_sizes_start_with_vllms_defaults_and_pad_a_step_by_at_most_a_quarter():
    sizes = capture_sizes(8192)
    assert sizes == sorted(set(sizes)) and sizes[-1] == 8192
    below = [s for s in sizes if s <= VLLM_DEFAULT_MAX]
    assert below == [1, 2, 4, *range(8, 256, 8), *range(256, 513, 16)]
    for tokens in range(1, 8193):  # every step size is padded to the next captured one
        padded = next(s for s in sizes if s >= tokens)
        assert padded - tokens <= max(tokens // 4, 15), (tokens, padded)
    assert capture_sizes(1000)[-2:] == [896, 1000]  # the cap itself is captured
    assert capture_sizes(300)[-1] == 300 and max(capture_sizes()) == 16384


def _engine_args(model_dir, *argv):
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = EngineArgs.add_cli_args(FlexibleArgumentParser())
    return EngineArgs.from_cli_args(parser.parse_args(["--model", str(model_dir), *argv]))


def _compilation_sizes(engine_args):
    """The capture sizes in the compilation config vLLM builds from these arguments (the same
    merge `create_engine_config` does: the EngineArgs field, else the compilation config's)."""
    sizes = engine_args.cudagraph_capture_sizes
    return sizes if sizes is not None else engine_args.compilation_config.cudagraph_capture_sizes


def test_a_gpu_server_gets_graphs_for_mixed_steps_up_to_its_batch_token_limit(tmp_path):
    args = _engine_args(tmp_path, "--max-num-batched-tokens", "4096")
    sizes = extend_for_mixed_steps(args, on_cpu=False)
    assert sizes[-1] == 4096 and _compilation_sizes(args) == sizes
    args = _engine_args(tmp_path)
    assert _compilation_sizes(args) is None  # vLLM's default ...
    extend_for_mixed_steps(args, on_cpu=False)
    assert _compilation_sizes(args)[-1] == 16384  # ... and ours (vLLM drops what exceeds its limit)
    args = _engine_args(tmp_path, "--max-num-batched-tokens", "65536")
    assert extend_for_mixed_steps(args, on_cpu=False)[-1] == 16384  # larger steps are GPU-bound


@pytest.mark.parametrize("argv", [["--enforce-eager"], ["--max-cudagraph-capture-size", "64"],
                                  ["--cudagraph-capture-sizes", "1", "2", "8"],
                                  ["--compilation-config", '{"cudagraph_capture_sizes": [1, 2]}'],
                                  ["--compilation-config", '{"max_cudagraph_capture_size": 32}'],
                                  ["--performance-mode", "interactivity"]])
def test_the_users_choice_of_graphs_and_the_cpu_are_left_alone(argv, tmp_path):
    args = _engine_args(tmp_path, *argv)
    before = _compilation_sizes(args)
    assert extend_for_mixed_steps(args, on_cpu=False) is None
    assert _compilation_sizes(args) == before
    plain = _engine_args(tmp_path)
    assert extend_for_mixed_steps(plain, on_cpu=True) is None and _compilation_sizes(plain) is None
