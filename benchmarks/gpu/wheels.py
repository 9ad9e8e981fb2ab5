"""The wheels the offline GPU image lacks: built and downloaded here, installed there.

    python -m benchmarks.gpu.wheels build      # make gpu-wheels (this CPU machine, PyPI reachable)
    python -m benchmarks.gpu.wheels install --out install.json   # first part of make gpu-check (GPU)

`constraints/gpu.txt` is the list: every `==` pin but the image's own torch and triton is carried
in `.whl/`. `build` builds cliperase (this tree) and deepspeed (its sdist, DS_BUILD_OPS=0) as
wheels, downloads the others for the image's CPython 3.12 on x86-64 (plus `INSURANCE`: wheels the
image has at an unrecorded version, carried in case its version is too old; pip uses the image's
when it satisfies), writes the tree's source digest beside them, resolves the install against a
fake image (the image's packages as empty dist-infos in a bare venv, `pip --python ... install
--dry-run --no-index`), and measures `.whl/` plus the tree that travels against the device
tool's 64 MiB. It fails loudly on any of these.

`install` runs pip offline into the image's own python (`pip install --no-index --find-links
.whl -c constraints/gpu.txt`): the machine is thrown away after the lease, and a venv with
--system-site-packages would not see the image's packages, since its python3 is itself a venv
(/opt/torch/.venv) whose packages are not the base interpreter's site-packages. torch and triton
are checked to be the same before and after. A carried cliperase wheel older than the tree (the
digest differs) is rebuilt offline from the tree first.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.metadata as md
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional

from benchmarks.gpu import write_json

__all__ = ["pins", "carried_pins", "source_digest", "tree_bytes", "main", "LIMIT_BYTES"]

ROOT = Path(__file__).resolve().parents[2]
WHEELS = ROOT / ".whl"
CONSTRAINTS = ROOT / "constraints" / "gpu.txt"
DIGEST_FILE = "cliperase-source.sha256"
LIMIT_BYTES = 64 * 2**20  # the device tool's cap on the tree plus carried paths
IMAGE_OWN = ("torch", "triton")
BUILT = ("cliperase", "deepspeed")
INSURANCE = {"timm": "1.0.31", "typing-extensions": "4.16.0"}  # open_clip: timm>=1.0.17; pydantic: t-e>=4.16
PYTHON = "3.12"  # the image's CPython (3.12.3, KINDS.md)
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
# The image's packages that the carried ones need (KINDS.md's list), with the versions a session
# read there; None: present, version not recorded (the fake gets this machine's version).
IMAGE = {"torch": "2.11.0", "triton": "3.6.0", "numpy": "2.5.2", "torchvision": "0.26.0", "huggingface-hub": "1.33.0",
         "safetensors": "0.8.0", "timm": None, "pillow": None, "matplotlib": None, "tensorboard": None, "tqdm": None,
         "nvidia-ml-py": None, "pytest": None, "pytest-benchmark": None, "regex": None, "pyyaml": None, "packaging": None,
         "einops": None, "msgpack": None, "ninja": None, "psutil": None, "py-cpuinfo": None, "typing-extensions": None,
         "setuptools": None, "wheel": None, "filelock": None, "fsspec": None, "jinja2": None, "networkx": None,
         "sympy": None}
RESOLVER_PIP = "pip==26.3"  # the fake-image resolve's pip (--dry-run with --platform)
REQUIREMENTS = ("cliperase[dev,triton]", "inf-cl")  # what gpu-check installs
IMPORTS = ("open_clip", "deepspeed", "webdataset", "inf_cl", "cliperase.engine", "cliperase.kernels")


def pins(constraints: Path = CONSTRAINTS) -> Dict[str, str]:
    """{name: version} of every `name==version` line."""
    found = {}
    for line in constraints.read_text().splitlines():
        m = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)==([^\s#]+)\s*(#.*)?", line)
        if m:
            found[m.group(1)] = m.group(2)
    return found


def carried_pins(constraints: Path = CONSTRAINTS) -> Dict[str, str]:
    """{name: version} of every pin but the image's own packages."""
    return {name: v for name, v in pins(constraints).items() if name.lower() not in IMAGE_OWN}


def source_digest(root: Path = ROOT) -> str:
    """sha256 over the files the cliperase wheel is built from (paths and bytes)."""
    h = hashlib.sha256()
    files = [root / "pyproject.toml", *sorted((root / "engine").rglob("*")), *sorted((root / "kernels").rglob("*"))]
    for f in files:
        if f.is_file() and "__pycache__" not in f.parts:
            h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def tree_bytes(root: Path = ROOT) -> int:
    """Bytes of what the device tool sends besides carried paths: tracked and untracked,
    not-ignored files."""
    names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                           check=True, capture_output=True).stdout.split(b"\0")
    return sum((root / n.decode()).stat().st_size for n in names if n and (root / n.decode()).is_file())


def _pip(*args: str, pip: Optional[List[str]] = None, env: Optional[dict] = None) -> None:
    cmd = [*(pip or [sys.executable, "-m", "pip"]), *args]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env={**os.environ, **(env or {})})


def _fake_image(where: Path) -> Path:
    """A bare venv whose site-packages holds an empty dist-info per IMAGE package; its python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(where)], check=True)
    site = next(where.glob("lib/python3*/site-packages"))
    for name, version in IMAGE.items():
        if version is None:
            try:
                version = md.version(name)
            except md.PackageNotFoundError:
                version = "0"
        info = site / f"{name.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        (info / "INSTALLER").write_text("fake-image\n")
        (info / "RECORD").write_text("")
    return where / "bin" / "python"


def dry_resolve(wheels: Path) -> List[str]:
    """The `name==version`s pip would install on the fake image from `wheels` alone; raises
    CalledProcessError with pip's reason when something is missing. Runs RESOLVER_PIP from its
    wheel: pip 23.2 refuses platform options with --dry-run."""
    with tempfile.TemporaryDirectory(prefix="fake-image-") as tmp:
        python = _fake_image(Path(tmp) / "venv")
        _pip("download", "--quiet", "--no-deps", "--only-binary=:all:", "-d", tmp, RESOLVER_PIP)
        pip = [sys.executable, str(next(Path(tmp).glob("pip-*.whl")) / "pip")]
        report = Path(tmp) / "report.json"
        platforms = [x for p in PLATFORMS for x in ("--platform", p)]
        _pip("--python", str(python), "install", "--dry-run", "--quiet", "--no-index", "--find-links", str(wheels),
             "-c", str(CONSTRAINTS), "--python-version", PYTHON, "--implementation", "cp", "--only-binary=:all:",
             *platforms, "--report", str(report), *REQUIREMENTS, pip=pip)
        items = json.loads(report.read_text())["install"]
    return sorted(f"{i['metadata']['name']}=={i['metadata']['version']}" for i in items)


def build(wheels: Path = WHEELS) -> int:
    """make gpu-wheels: see the module docstring. Returns 0, or 1 when over LIMIT_BYTES."""
    pins = carried_pins()
    if wheels.exists():
        shutil.rmtree(wheels)  # one version of each: two would stop the install
    wheels.mkdir()
    had_build = (ROOT / "build").exists()
    _pip("wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(ROOT))
    if not had_build:  # setuptools builds in the tree; what it leaves there would travel too
        shutil.rmtree(ROOT / "build", ignore_errors=True)
    _pip("wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(wheels), f"deepspeed=={pins['deepspeed']}",
         env={"DS_BUILD_OPS": "0"})
    platforms = [x for p in PLATFORMS for x in ("--platform", p)]
    downloads = [f"{n}=={v}" for n, v in {**pins, **INSURANCE}.items() if n not in BUILT]
    _pip("download", "--quiet", "--no-deps", "--only-binary=:all:", "--python-version", PYTHON, "--implementation", "cp",
         *platforms, "-d", str(wheels), *downloads)
    (wheels / DIGEST_FILE).write_text(source_digest() + "\n")
    missing = [n for n in pins if not any(_dist_name(w) == _norm(n) for w in wheels.glob("*.whl"))]
    if missing:
        raise SystemExit(f"gpu-wheels: no wheel in {wheels} for {missing}")
    resolved = dry_resolve(wheels)
    print(f"gpu-wheels: on the image pip would install {len(resolved)}: {' '.join(resolved)}")
    carried = sum(f.stat().st_size for f in wheels.iterdir())
    tree = tree_bytes()
    total = carried + tree
    print(f"gpu-wheels: .whl {carried / 2**20:.1f} MiB ({len(list(wheels.glob('*.whl')))} wheels) + tree "
          f"{tree / 2**20:.1f} MiB = {total / 2**20:.1f} MiB of {LIMIT_BYTES / 2**20:.0f} MiB")
    if total > LIMIT_BYTES:
        print(f"gpu-wheels: OVER the device tool's {LIMIT_BYTES / 2**20:.0f} MiB: the run would be refused", file=sys.stderr)
        return 1
    return 0


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _dist_name(wheel: Path) -> str:
    return _norm(wheel.name.split("-")[0])


def _versions(names) -> Dict[str, Optional[str]]:
    out = {}
    for n in names:
        try:
            out[n] = md.version(n)
        except md.PackageNotFoundError:
            out[n] = None
    return out


def _project_wheel(wheels: Path, scratch: Path, res: dict) -> Path:
    """The carried cliperase wheel, or one built offline from the tree when the tree has changed since."""
    carried = sorted(wheels.glob("cliperase-*.whl"))
    digest = (wheels / DIGEST_FILE).read_text().strip() if (wheels / DIGEST_FILE).exists() else None
    if carried and digest == source_digest():
        res["project_wheel"] = "carried (matches the tree)"
        return carried[0]
    res["project_wheel"] = "rebuilt offline from the tree (the carried one is stale or missing)"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
                    "-w", str(scratch), str(ROOT)], check=True)
    return next(scratch.glob("cliperase-*.whl"))


def install(out: Path, wheels: Path = WHEELS) -> int:
    """make gpu-check's install (see the module docstring); the record goes to `out`. 0 when the
    carried packages import and torch/triton are untouched."""
    res: Dict[str, object] = {"python": sys.version, "executable": sys.executable}
    image_before = _versions(IMAGE_OWN)
    with tempfile.TemporaryDirectory(prefix="cliperase-wheel-") as scratch:
        wheel = _project_wheel(wheels, Path(scratch), res)
        cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(wheels), "-c", str(CONSTRAINTS),
               "--no-cache-dir", "--disable-pip-version-check", "--no-warn-script-location",
               f"{wheel}[{REQUIREMENTS[0].split('[')[1]}", *REQUIREMENTS[1:]]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        res["pip"] = {"command": cmd, "rc": proc.returncode, "output_tail": (proc.stdout + proc.stderr)[-3000:]}
        if proc.returncode != 0:
            # The resolve failed (an image version below a carried package's need, say): put the
            # carried packages the image lacks in place without their dependency checks.
            have = {_norm(d.metadata["Name"]) for d in md.distributions()}
            lacking = [str(w) for w in sorted(wheels.glob("*.whl")) if _dist_name(w) not in have and w.name != wheel.name]
            lacking.append(str(wheel))
            fb = subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--no-cache-dir",
                                 "--disable-pip-version-check", *lacking], capture_output=True, text=True)
            res["fallback_no_deps"] = {"wheels": [Path(w).name for w in lacking], "rc": fb.returncode,
                                       "output_tail": (fb.stdout + fb.stderr)[-2000:]}
    probe = subprocess.run([sys.executable, "-c", f"import {', '.join(IMPORTS)}"], capture_output=True, text=True)
    res.update(image_before=image_before, image_after=_versions(IMAGE_OWN), imports_ok=probe.returncode == 0,
               import_error=probe.stderr[-2000:] or None,
               versions=_versions([*carried_pins(), *INSURANCE, *IMAGE]))
    res["image_untouched"] = res["image_before"] == res["image_after"]
    write_json(out, res)
    return 0 if res["imports_ok"] and res["image_untouched"] else 1


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("build", help="make gpu-wheels: fill .whl/ (needs PyPI)")
    inst = sub.add_parser("install", help="install .whl/ offline into this python (the GPU image)")
    inst.add_argument("--out", required=True, type=Path, help="JSON record of the install")
    args = p.parse_args(argv)
    return build() if args.command == "build" else install(args.out)


if __name__ == "__main__":
    raise SystemExit(main())
