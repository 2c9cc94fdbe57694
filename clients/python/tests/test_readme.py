"""The READMEs' ten-line examples are tests: each runs as written (only the server URL is replaced,
and a logging set-up put before it), in a fresh interpreter, against a real node, and the
committed models are checked — the numpy example against a local replay of its arithmetic, the
PyTorch example (where torch is installed) against the module's final parameters."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import shoal

from conftest import REPO, Node, create_job, run

README = REPO / "clients" / "python" / "README.md"
ROOT_README = REPO / "README.md"


def examples(path) -> list[str]:
    return [b for b in re.findall(r"```python\n(.*?)```", path.read_text(), re.S) if "train_rounds(" in b]


def user_lines(code: str) -> int:
    return sum(1 for line in code.splitlines() if line.strip() and not line.strip().startswith("#"))


# Before the example: the SDK's log on stderr, shown if the example fails.
PROLOGUE = "import logging; logging.basicConfig(level=logging.INFO, format='%(asctime)s %(name)s %(levelname)s %(message)s')\n"


def run_example(code: str, url: str, epilogue: str, node: Node) -> dict:
    code = PROLOGUE + code.replace("nats://127.0.0.1:4222", url) + "\n" + epilogue
    try:
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = (e.stderr or b"").decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
        pytest.fail(f"the example did not finish in 120 s\nstdout:\n{out}\nstderr:\n{err}\nnode log (tail):\n{node.log_text()[-8000:]}")
    assert p.returncode == 0, f"{p.stdout}{p.stderr}\nnode log (tail):\n{node.log_text()[-8000:]}"
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_the_examples_are_ten_lines_and_the_same_in_both_readmes() -> None:
    ex = examples(README)
    assert len(ex) == 2, "a numpy and a PyTorch example"
    for code in ex:
        assert user_lines(code) <= 10, code
    root = examples(ROOT_README)
    assert root and all(r in ex for r in root), "README.md's Python example must be one of clients/python/README.md's"


def fetch(url: str, job: str, version: int) -> dict:
    async def go() -> dict:
        async with await shoal.ShoalClient.connect(url, "reader") as c:
            return await c.fetch_model(job, version)

    return run(go())


def test_numpy_readme_example_runs_against_a_node(cluster) -> None:
    server, node = cluster
    (code,) = [c for c in examples(README) if "import numpy" in c]
    job = re.search(r'train_rounds\([^,]+,\s*"([^"]+)"', code).group(1)
    create_job(server.url, {"job": job, "manifest": {"tensors": [{"name": "w", "dtype": "F32", "shape": [4]}]}, "round_policy": {"mode": "sync", "cohort_size": 1, "min_clients": 1, "deadline_ms": 60_000}, "rounds": 3})
    out = run_example(code, server.url, 'import json; print(json.dumps({"w": model["w"].tolist()}))', node)
    # Replay the example's arithmetic locally: three steps from the zero initial model.
    rng = np.random.default_rng(1)
    x = rng.normal(size=(64, 4)).astype(np.float32)
    y = x @ np.array([1.0, -2.0, 0.5, 3.0], np.float32)
    w = np.zeros(4, np.float32)
    for _ in range(3):
        w = w - 0.1 * x.T @ (x @ w - y) / len(x)
    committed = fetch(server.url, job, 3)["w"]
    assert np.array_equal(committed, w), (committed, w)
    assert np.array_equal(np.array(out["w"], np.float32), w)


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch is not installed: the PyTorch example runs where it is (ci.sh installs shoal-fl[torch])")
def test_torch_readme_example_runs_against_a_node(cluster) -> None:
    server, node = cluster
    (code,) = [c for c in examples(README) if "import torch" in c]
    job = re.search(r'train_rounds\([^,]+,\s*"([^"]+)"', code).group(1)
    create_job(server.url, {"job": job, "manifest": {"tensors": [{"name": "weight", "dtype": "F32", "shape": [1, 4]}, {"name": "bias", "dtype": "F32", "shape": [1]}]}, "round_policy": {"mode": "sync", "cohort_size": 1, "min_clients": 1, "deadline_ms": 60_000}, "rounds": 3})
    out = run_example(code, server.url, 'import json; print(json.dumps({k: v.tolist() for k, v in model.state_dict().items()}))', node)
    committed = fetch(server.url, job, 3)
    assert np.array_equal(committed["weight"], np.array(out["weight"], np.float32))
    assert np.array_equal(committed["bias"], np.array(out["bias"], np.float32))
    assert not np.array_equal(committed["weight"], np.zeros((1, 4), np.float32)), "three rounds trained something"


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch is not installed")
def test_torch_adapter_is_bit_exact_for_bf16_and_integers() -> None:
    import torch

    from shoal.messages import TensorSpec
    from shoal.tensors import from_safetensors, to_safetensors
    from shoal.torch import load_params, state_dict_to_params

    net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2)).to(torch.bfloat16)
    net[1].num_batches_tracked.fill_(7)
    state = net.state_dict()
    tensors = tuple(TensorSpec(k, {torch.bfloat16: "BF16", torch.int64: "I64"}[v.dtype], tuple(v.shape)) for k, v in state.items())
    data = to_safetensors(state_dict_to_params(state, tensors), tensors)
    back = from_safetensors(data, tensors)
    twin = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2)).to(torch.bfloat16)
    load_params(twin, back)
    for k, v in net.state_dict().items():
        assert torch.equal(twin.state_dict()[k], v), k
    assert int(twin[1].num_batches_tracked) == 7
