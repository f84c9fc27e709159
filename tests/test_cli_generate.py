"""`vtensor generate` through a subprocess (embedded default model), `vtensor chat`'s session
logic, and `python -m vtensor.bench.throughput` on a tiny random checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def test_vtensor_generate_cli_smoke(default_gguf_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "vtensor.cli", "generate", "What is the capital of France?",
           "--max-tokens", "6", "--device", "cpu", "--json"]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert 1 <= len(out["token_ids"]) <= 6 and out["text"].strip()
    assert out["finish_reason"] in ("length", "stop")
    assert "tok/s" in r.stderr and "device=cpu" in r.stderr
    # bad input: a clear message and exit status 2, no traceback
    bad = subprocess.run([*cmd[:4], "hi", "--device", "cpu", "--max-tokens", "0"],
                         capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
    assert bad.returncode == 2 and "max_tokens" in bad.stderr and "Traceback" not in bad.stderr


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, eos_token_id=2, bos_token_id=1)  # fmt: skip
    path = tmp_path_factory.mktemp("tiny32k")
    LlamaForCausalLM(cfg).save_pretrained(path, safe_serialization=True)
    return str(path)


def test_bench_throughput_quick(tiny_folder, tmp_path):
    from vtensor.bench.throughput import main

    out = tmp_path / "t.json"
    rc = main(["--quick", "--device", "cpu", "--model", tiny_folder, "--out", str(out),
               "-n", "6", "--max-output", "6"])  # fmt: skip
    assert rc == 0
    rep = json.loads(out.read_text())
    assert set(rep["systems"]) == {"virtual", "paged", "hf"}
    assert rep["same_tokens_virtual_paged"] is True
    for s in rep["systems"].values():
        assert s["output_tokens"] > 0 and s["output_tokens_per_s"] > 0 and s["complete"]
    assert rep["systems"]["virtual"]["output_tokens"] == rep["workload"]["output_tokens"]
    assert rep["ratios"]["tokens_per_s_virtual_vs_paged"] > 0


# ----------------------------------------------------------------------------- issue 15, CLI


def _vt(*args, timeout=120, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("VTENSOR_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "vtensor.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env=env, **kw)  # fmt: skip


def _one_line_error(r, rc=2):
    assert r.returncode == rc, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    lines = [x for x in r.stderr.splitlines() if x.strip() and "loading" not in x]
    assert len(lines) == 1, r.stderr
    return lines[0]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_item10_one_line_errors(tmp_path):
    import socket

    line = _one_line_error(_vt("serve", "--model", "/nonexistent", "--port", str(_free_port())))
    assert line.startswith("vtensor serve:") and "/nonexistent" in line
    if not torch.cuda.is_available():
        assert "no CUDA device" in _one_line_error(_vt("info", "--backend", "cuda"))
        assert "no CUDA device" in _one_line_error(_vt("generate", "hi", "--device", "cuda"))
    # A busy port is reported before the model loads (in seconds, not after the load).
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        r = _vt("serve", "--port", str(busy.getsockname()[1]), timeout=60)
    assert "already in use" in _one_line_error(r) and "loading" not in r.stderr


def test_item10_ctrl_c_during_generate(default_gguf_path):
    import signal
    import time

    # PYTHONFAULTHANDLER: if it hangs, SIGABRT makes it print every thread's stack
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONFAULTHANDLER": "1"}  # fmt: skip
    p = subprocess.Popen([sys.executable, "-m", "vtensor.cli", "generate", "Tell a long story.",
                          "--device", "cpu", "--max-tokens", "2000", "--ignore-eos"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=env)  # fmt: skip
    out = ""
    deadline = time.monotonic() + 120
    while len(out) < 20 and time.monotonic() < deadline:  # wait for generated text
        out += p.stdout.read(1)
    p.send_signal(signal.SIGINT)
    try:
        rest, err = p.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        p.send_signal(signal.SIGABRT)
        rest, err = p.communicate(timeout=30)
        pytest.fail(f"no exit 60 s after Ctrl-C; its threads:\n{err[-6000:]}")
    assert p.returncode == 130, err[-2000:]
    assert "interrupted" in err and "Traceback" not in err, err[-2000:]


def test_ctrl_c_sets_a_flag_then_a_second_one_raises():
    """Generation checks the flag between engine steps; a KeyboardInterrupt inside a step
    could leave a lock held or a page map half submitted."""
    import signal

    from vtensor.entrypoints.common import interrupt_between_steps

    before = signal.getsignal(signal.SIGINT)
    with interrupt_between_steps() as interrupted:
        assert not interrupted()
        signal.raise_signal(signal.SIGINT)  # no exception: just the flag
        assert interrupted()
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before


def test_item11_prompts_options_and_help(tmp_path, monkeypatch, capsys):
    from vtensor.cli import build_parser
    from vtensor.entrypoints.generate import read_prompts

    assert "empty" in _one_line_error(_vt("generate", ""))
    assert "empty" in _one_line_error(_vt("generate", "--raw", "  "))
    # not a model: the message names the CLI option, not the Python keyword
    line = _one_line_error(_vt("generate", "hi", "--model", str(tmp_path), "--device", "cpu"))
    assert "--load-format" in line and "load_format=" not in line
    # no abbreviations: --max-tok is an error, not --max-tokens
    r = _vt("generate", "hi", "--max-tok", "3")
    assert r.returncode == 2 and "--max-tok" in r.stderr
    # no prompt and a terminal on stdin: say that it reads stdin
    import io

    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stdin", Tty("a question"))
    assert read_prompts(build_parser(["generate"]).parse_args(["generate"])) == ["a question"]
    assert "stdin" in capsys.readouterr().err
    # every option of every subcommand we own has help text
    for cmd in ("generate", "chat", "serve"):
        parser = build_parser([cmd])
        sub = next(a for a in parser._actions if a.dest == "command").choices[cmd]
        missing = [a.option_strings for a in sub._actions if a.help is None]
        assert not missing, (cmd, missing)


def test_item9_generate_says_it_is_loading(default_gguf_path):
    r = _vt("generate", "Hi", "--max-tokens", "2", "--device", "cpu", timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "loading the embedded SmolLM2" in r.stderr and "model loaded in" in r.stderr


def test_items8_9_12_setup_and_readme():
    import tomllib

    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert isinstance(meta["project"]["license"], str)  # SPDX: no setuptools deprecation
    script = (ROOT / "scripts" / "setup.sh").read_text()
    assert "up to date" in script and script.count('say "installing') >= 3
    # README: the `vtensor` commands work as written once the venv is activated, and it says so
    readme = (ROOT / "README.md").read_text()
    using = readme.split("## Using it", 1)[1].split("\n## ", 1)[0]
    first = next(x for x in using.splitlines() if x.strip() and not x.startswith("```"))
    assert ".venv/bin/activate" in first, first


@pytest.mark.skipif(not (ROOT / ".venv" / ".vtensor-setup").exists(),
                    reason="scripts/setup.sh never ran in this checkout")  # fmt: skip
def test_item12_setup_second_run_only_checks():
    import time

    root = str(ROOT)
    first = subprocess.run(["bash", "scripts/setup.sh"], cwd=root, capture_output=True,
                           text=True, timeout=900)  # fmt: skip
    assert first.returncode == 0, first.stderr[-2000:]
    t0 = time.monotonic()
    r = subprocess.run(["bash", "scripts/setup.sh"], cwd=root, capture_output=True, text=True,
                       timeout=120)  # fmt: skip
    assert r.returncode == 0 and "up to date" in r.stdout, r.stdout + r.stderr
    assert time.monotonic() - t0 < 30
    assert "deprecated" not in (first.stdout + first.stderr + r.stdout + r.stderr).lower()
