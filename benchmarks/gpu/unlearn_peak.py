"""launch/unlearn.py's CLI, with this process's torch allocator peak written as JSON to
$GPU_CHECK_PEAK_JSON every second and at the end (the run's report.json has NVML telemetry but
not torch's peak; the periodic write keeps the figure when the kit's cap ends the run early,
during its final checkpoint, say).

    GPU_CHECK_PEAK_JSON=peak.json deepspeed --num_gpus 1 benchmarks/gpu/unlearn_peak.py <unlearn.py arguments>
"""
import json
import os
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[0] = str(ROOT)  # the repo root, not this folder (whose module names could shadow others)

import torch  # noqa: E402

from launch.unlearn import main  # noqa: E402


def write_peak(path: Path) -> None:
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    peak = {"device": torch.cuda.get_device_name() if cuda else "cpu",
            "max_memory_allocated": torch.cuda.max_memory_allocated() if cuda else None,
            "max_memory_reserved": torch.cuda.max_memory_reserved() if cuda else None}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(peak) + "\n")
    os.replace(tmp, path)


def _every_second(path: Path, stop: threading.Event) -> None:
    while not stop.wait(1.0):
        write_peak(path)


if __name__ == "__main__":
    target = os.environ.get("GPU_CHECK_PEAK_JSON") if os.environ.get("RANK", "0") == "0" else None
    stop = threading.Event()
    if target:
        threading.Thread(target=_every_second, args=(Path(target), stop), daemon=True).start()
    rc = main(sys.argv[1:])
    stop.set()
    if target:
        write_peak(Path(target))
    sys.exit(rc)
