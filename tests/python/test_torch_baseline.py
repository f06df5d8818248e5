"""bench/cuda/torch_baseline.py (the PyTorch baseline of the CUDA benchmark) runs on CPU
with tiny sizes and writes every figure to its JSON file."""

import importlib.util
import json
import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "bench", "cuda", "torch_baseline.py")
TINY = os.path.join(ROOT, "tests", "data", "models", "tiny-lm2")
TINY_ARGS = ["--model", TINY, "--decode-tokens", "4", "--sessions", "2", "--warmup", "1",
             "--device", "cpu", "--dtype", "float32"]


def load_script():
    spec = importlib.util.spec_from_file_location("torch_baseline", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cpu_run_writes_every_figure(tmp_path):
    out = tmp_path / "baseline.json"
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)  # the script finds tools/ itself
    proc = subprocess.run([sys.executable, SCRIPT] + TINY_ARGS +
                          ["--prefill", "8,100000", "--json", str(out)],
                          cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for line in ("device: cpu", "decode batch 1:", "end_segment batch 1:", "prefill 8:",
                 "prefill 100000: skipped", "decode 2 sessions:"):
        assert line in proc.stdout, proc.stdout

    r = json.loads(out.read_text())
    assert r["device"].startswith("cpu") and r["device_type"] == "cpu"
    assert r["torch_version"] == torch.__version__
    assert r["dtype"] == "float32"
    assert r["config"]["hidden_size"] == 64 and r["config"]["memory_slots"] == 16
    assert r["parameters"] > 0
    assert r["decode_batch1"]["tokens"] == 4 and r["decode_batch1"]["tokens_per_s"] > 0
    assert r["end_segment"]["batch"] == 1 and r["end_segment"]["ms"] > 0
    assert [p["tokens"] for p in r["prefill"]] == [8, 100000]
    assert r["prefill"][0]["tokens_per_s"] > 0
    assert "max_position_embeddings" in r["prefill"][1]["skipped"]
    assert [s["sessions"] for s in r["sessions"]] == [2]
    s = r["sessions"][0]
    assert s["tokens"] == 2 * 4 and s["tokens_per_s"] > 0 and s["end_segment_ms"] > 0


def test_out_of_memory_is_reported_and_the_run_goes_on(tmp_path, capsys, monkeypatch):
    mod = load_script()
    real = mod.Bench.decode

    def decode(self, batch, *args):
        if batch == 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
        return real(self, batch, *args)

    monkeypatch.setattr(mod.Bench, "decode", decode)
    out = tmp_path / "baseline.json"
    args = TINY_ARGS + ["--sessions", "3,2", "--prefill", "4", "--repeats", "1",
                        "--json", str(out)]  # the later --sessions wins
    assert mod.main(args) == 0
    assert "decode 3 sessions: out of memory: CUDA out of memory" in capsys.readouterr().out
    r = json.loads(out.read_text())
    assert r["sessions"][0] == {"sessions": 3,
                                "error": "out of memory: CUDA out of memory. Tried to allocate 2 GiB"}
    assert r["sessions"][1]["sessions"] == 2 and r["sessions"][1]["tokens_per_s"] > 0
