"""launch/unlearn.py's CLI, then this process's torch allocator peak written as JSON to
$GPU_CHECK_PEAK_JSON (the run's report.json has NVML telemetry but not torch's peak).

    GPU_CHECK_PEAK_JSON=peak.json deepspeed --num_gpus 1 benchmarks/gpu/unlearn_peak.py <unlearn.py arguments>
"""
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[0] = str(ROOT)  # the repo root, not this folder (whose module names could shadow others)

from launch.unlearn import main  # noqa: E402

if __name__ == "__main__":
    rc = main(sys.argv[1:])
    import torch

    if os.environ.get("GPU_CHECK_PEAK_JSON") and os.environ.get("RANK", "0") == "0":
        cuda = torch.cuda.is_available()
        peak = {"device": torch.cuda.get_device_name() if cuda else "cpu",
                "max_memory_allocated": torch.cuda.max_memory_allocated() if cuda else None,
                "max_memory_reserved": torch.cuda.max_memory_reserved() if cuda else None}
        Path(os.environ["GPU_CHECK_PEAK_JSON"]).write_text(json.dumps(peak) + "\n")
    sys.exit(rc)
