"""``neurosem doctor``: check the installation and say how to fix each problem.

The classic trap: PyPI's torchvision wheels are built against PyPI's (CUDA) torch and pin one torch
version. On a CPU-only torch build, or next to another torch version, ``import torchvision`` fails
(``operator torchvision::nms does not exist``). The doctor finds that without importing torchvision
in this process, and ``--fix`` reinstalls a matching pair with pip.
"""
from __future__ import annotations

import importlib.metadata as md
import json
import platform
import re
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class Check:
    """One line of the report."""

    name: str
    ok: bool
    detail: str
    fix: str = ""


@dataclass
class Report:
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def add(self, name: str, ok: bool, detail: str, fix: str = "") -> None:
        self.checks.append(Check(name, ok, detail, fix))

    def render(self) -> str:
        lines = []
        for c in self.checks:
            lines.append(f"[{'ok' if c.ok else 'FAIL'}] {c.name:<12} {c.detail}")
            if c.fix:
                lines.append(f"       fix: {c.fix}")
        lines.append("all good" if self.ok else "problems found: apply the fixes above (or run `neurosem doctor --fix`)")
        return "\n".join(lines)


def _version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def torch_pin_of_torchvision() -> str | None:
    """The exact torch version the installed torchvision wheel requires (``torch==X``), if any."""
    try:
        requires = md.requires("torchvision") or []
    except md.PackageNotFoundError:
        return None
    for req in requires:
        m = re.match(r"^torch\s*\(?\s*==\s*([0-9][^\s,;)]*)", req)
        if m:
            return m.group(1)
    return None


def _base(version: str) -> str:
    return version.split("+", 1)[0]


def _import_in_subprocess(module: str) -> tuple[bool, str]:
    """Import ``module`` in a fresh interpreter; a broken extension cannot poison this process."""
    code = f"import {module} as m; print(getattr(m, '__version__', '?'))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    if proc.returncode == 0:
        return True, proc.stdout.strip()
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    return False, lines[-1] if lines else f"exit status {proc.returncode}"


def fix_command(torch_version: str | None, torchvision_version: str | None) -> list[str]:
    """The pip command that installs a torch/torchvision pair that fit each other.

    PyPI's pair works everywhere (the CUDA build runs on CPU too). Upgrading both to the newest
    release is the one command that cannot leave a mismatch behind.
    """
    return [sys.executable, "-m", "pip", "install", "--upgrade", "--force-reinstall", "--no-cache-dir",
            "torch", "torchvision"]


def diagnose() -> Report:
    """Run every check; nothing here imports torchvision into this process."""
    rep = Report()
    rep.add("python", sys.version_info >= (3, 9), f"{platform.python_version()} ({sys.executable})",
            "" if sys.version_info >= (3, 9) else "use Python 3.9 or newer")
    from neurosem import __version__

    rep.add("neurosem", True, f"{__version__} ({Path(__file__).resolve().parent})")

    tv = _version("torch")
    if tv is None:
        rep.add("torch", False, "not installed", "pip install torch  (or reinstall neurosem: pip install -e .)")
        return rep
    import torch

    cuda_build = torch.version.cuda
    rep.add("torch", True, f"{torch.__version__} ({'CUDA ' + cuda_build if cuda_build else 'CPU-only'} build)")

    # devices
    if torch.cuda.is_available():
        names = ", ".join(f"cuda:{i} {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count()))
        rep.add("device", True, f"--device auto uses CUDA: {names}")
    else:
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            rep.add("device", True, "--device auto uses Apple MPS")
        else:
            why = "torch is a CPU-only build" if not cuda_build else "no CUDA device visible"
            rep.add("device", True, f"--device auto uses the CPU ({why}; {torch.get_num_threads()} threads)")

    # torchvision
    tvv = _version("torchvision")
    pin = torch_pin_of_torchvision()
    if tvv is None:
        rep.add("torchvision", False, "not installed (needed for torchvision models, weights and CIFAR)",
                "pip install torchvision  (it must match torch: " + tv + ")")
    else:
        ok, out = _import_in_subprocess("torchvision")
        if ok:
            rep.add("torchvision", True, f"{out} imports")
        else:
            why = out
            if pin and _base(pin) != _base(torch.__version__):
                why += f"; torchvision {tvv} was built for torch=={pin} but torch {torch.__version__} is installed"
            elif "+cpu" in torch.__version__ or not cuda_build:
                why += (f"; torchvision {tvv} from PyPI is built against PyPI's CUDA torch and does not load "
                        f"on the CPU-only torch {torch.__version__}")
            rep.add("torchvision", False, f"{tvv} fails to import: {why}",
                    "install a matching pair: `" + " ".join(fix_command(tv, tvv)[1:]).replace("-m pip", "pip", 1)
                    + "` (PyPI's pair runs on CPU too), or the CPU builds of both from PyTorch's own CPU wheel "
                      "index (the --index-url on pytorch.org's install page)")

    # libraries
    for dist in ("numpy", "scipy", "scikit-learn", "h5py", "matplotlib", "numba", "click", "tqdm", "pillow"):
        v = _version(dist)
        rep.add(dist, v is not None, v or "not installed", "" if v else f"pip install {dist}")

    # torch hub cache, where torchvision's pretrained weights are looked up
    from neurosem.models import weights_cache_dir

    hub = weights_cache_dir()
    cached = sorted(p.name for p in hub.glob("*.pth")) if hub.is_dir() else []
    shown = ", ".join(cached[:5]) + (" ..." if len(cached) > 5 else "") if cached else "none cached"
    rep.add("weights", True, f"torch cache {hub} ({shown}); put downloaded .pth files there or use --weights FILE")
    return rep


def apply_fix(report: Report) -> bool:
    """Reinstall torch/torchvision with pip when the torchvision check failed; True when it now imports."""
    bad = [c for c in report.checks if c.name == "torchvision" and not c.ok]
    if not bad:
        return True
    cmd = fix_command(_version("torch"), _version("torchvision"))
    print("running: " + " ".join(cmd), flush=True)
    if subprocess.run(cmd).returncode != 0:
        return False
    ok, out = _import_in_subprocess("torchvision")
    print(f"torchvision {'imports now' if ok else 'still fails: ' + out}")
    return ok


def run_doctor(fix: bool = False, as_json: bool = False) -> bool:
    """Print the report; with ``fix`` repair torchvision. Returns True when everything is fine.

    Example:
        >>> run_doctor()  # doctest: +SKIP
        [ok] python       3.11.7 (...)
    """
    rep = diagnose()
    if as_json:
        print(json.dumps({"ok": rep.ok, "checks": [asdict(c) for c in rep.checks]}, indent=2))
    else:
        print(rep.render())
    if fix and not rep.ok:
        return apply_fix(rep) and diagnose().ok
    return rep.ok
