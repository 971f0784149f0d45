"""Launching neurosem on two CPU processes (gloo): through ``torchrun``, or spawned by hand."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Mapping, Sequence

ROOT = Path(__file__).resolve().parents[2]
MODEL = str(Path(__file__).with_name("_model.py")) + ":make"


def _env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update({"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "NEUROSEM_NO_PROGRESS": "1",
                "CUDA_VISIBLE_DEVICES": ""})
    env.update(extra or {})
    return env


def torchrun(args: Sequence[str], nproc: int = 2, env: Mapping[str, str] | None = None,
             timeout: float = 240) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node N -m neurosem -- ARGS`` (stdout and stderr as text)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "neurosem", "--", *args]
    return subprocess.run(cmd, cwd=ROOT, env=_env(env), capture_output=True, text=True, timeout=timeout)


def spawn(argvs: Sequence[Sequence[str]], timeout: float = 240, module: str = "neurosem"
          ) -> list[subprocess.CompletedProcess]:
    """One ``python -m MODULE ARGV`` per rank, with the environment torchrun would set."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank, argv in enumerate(argvs):
        env = _env({"WORLD_SIZE": str(len(argvs)), "RANK": str(rank), "LOCAL_RANK": str(rank),
                    "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
        procs.append(subprocess.Popen([sys.executable, "-m", module, *argv], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=timeout)
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return out


def error_lines(text: str) -> list[str]:
    """The ``error: ...`` lines neurosem printed (torchrun's own report is left out)."""
    return [line for line in text.splitlines() if line.startswith("error: ")]
