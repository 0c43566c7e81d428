"""A run killed with SIGKILL and resumed ends with the same weights, bit for bit."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.training.conftest import tiny_controlnet_config


def _losses(out: Path) -> dict[int, str]:
    with (out / "metrics.csv").open() as f:
        return {int(r["step"]): r["value"] for r in csv.DictReader(f) if r["metric"] == "loss"}


def _cli(config: Path, out: Path, *extra: str, **env: str) -> subprocess.Popen:
    # Float results depend on the intra-op thread count (reduction order): the runs compared here
    # all use this process's count, as a resumed run must use the killed run's.
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()), **env)
    cmd = [sys.executable, "-m", "controlstack.cli.main", "train", "controlnet", "--config", str(config),
           "--output", str(out), *extra]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


# Minimal Impact ControlNet's stage 2: rebalanced data, the mi injection and the conservativity
# term (its own random streams: the rebalancing's regions and the Rademacher probes)
MI_STAGE2 = {"rebalance_probability": 1.0, "injection": "mi", "conservativity_weight": 0.01}


@pytest.mark.parametrize("extra", [{}, MI_STAGE2], ids=["plain", "mi-stage2"])
def test_sigkill_and_resume_matches_uninterrupted_run(world_dir, tiny_base_dir, tmp_path, extra):
    from controlstack.training.controlnet import train

    # EMA + gradient accumulation 2 + a checkpoint in the middle of an epoch (4 batches per epoch,
    # step 3 = micro-batch 6): every piece of state that resume must restore is exercised.
    kw = dict(max_steps=6, checkpoint_every=3, gradient_accumulation_steps=2, use_ema=True, ema_decay=0.9,
              num_validation_images=0, **extra)
    reference = tiny_controlnet_config(world_dir, tiny_base_dir, tmp_path / "reference", **kw)
    ref_model = train(reference)

    config_file = tmp_path / "cn.yaml"
    config_file.write_text(yaml.safe_dump(reference.to_dict()))
    out = tmp_path / "killed"
    proc = _cli(config_file, out, CONTROLSTACK_TRAIN_STEP_DELAY="0.4")
    deadline = time.time() + 120
    while time.time() < deadline:  # kill once step 3 is checkpointed and step 4 has been taken
        if (out / "checkpoints" / "step-0000003").is_dir() and 4 in _losses(out):
            break
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "model").exists() and not (out / "checkpoints" / "step-0000006").exists()

    resumed = _cli(config_file, out, "--resume")
    assert resumed.wait(timeout=180) == 0, resumed.stderr.read().decode()

    a = load_file(Path(ref_model) / "diffusion_pytorch_model.safetensors")
    b = load_file(out / "model" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and len(a) > 50
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the log of the resumed run is the uninterrupted run's log (rows of the killed tail dropped)
    assert _losses(out) == _losses(tmp_path / "reference")
    assert sorted(_losses(out)) == [1, 2, 3, 4, 5, 6]
