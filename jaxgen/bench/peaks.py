"""Published peaks of accelerators, keyed by `jax.devices()[0].device_kind`: bf16 dense FLOP/s
for MFU (`bench train`), HBM bandwidth for the memory-bound benches (the cache path, a decode
step's weight-read floor). On a CPU or an unknown device there is no published figure: callers
measure a matmul peak or report absolute numbers only."""
from __future__ import annotations

import re

import jax

# (pattern searched in the lowercased device_kind, name, bf16 dense TFLOP/s per device); first match wins
PEAK_TFLOPS = (
    (r"gh200", "NVIDIA GH200", 989.0),
    (r"h200.*nvl", "NVIDIA H200 NVL", 835.0),
    (r"h200", "NVIDIA H200 SXM", 989.0),
    (r"h100.*pcie", "NVIDIA H100 PCIe", 756.0),
    (r"h100.*nvl", "NVIDIA H100 NVL", 835.0),
    (r"h100", "NVIDIA H100 SXM", 989.0),
    (r"b200", "NVIDIA B200", 2250.0),
    (r"a100", "NVIDIA A100", 312.0),
    (r"l40s", "NVIDIA L40S", 362.0),
    (r"\bl4\b", "NVIDIA L4", 121.0),
    (r"v6 ?lite|v6e", "TPU v6e", 918.0),
    (r"v5 ?lite|v5e", "TPU v5e", 197.0),
    (r"v5p|tpu v5\b", "TPU v5p", 459.0),
    (r"tpu v4\b", "TPU v4", 275.0),
)

# (pattern searched in the lowercased device_kind, name, HBM GB/s per device); first match wins
PEAK_HBM_GBPS = (
    (r"gh200", "NVIDIA GH200", 4900.0),
    (r"h200", "NVIDIA H200", 4800.0),
    (r"h100.*pcie", "NVIDIA H100 PCIe", 2000.0),
    (r"h100.*nvl", "NVIDIA H100 NVL", 3900.0),
    (r"h100", "NVIDIA H100 SXM", 3350.0),
    (r"b200", "NVIDIA B200", 8000.0),
    (r"a100.*40", "NVIDIA A100 40GB", 1555.0),
    (r"a100", "NVIDIA A100 80GB", 2039.0),
    (r"l40s", "NVIDIA L40S", 864.0),
    (r"\bl4\b", "NVIDIA L4", 300.0),
    (r"v6 ?lite|v6e", "TPU v6e", 1640.0),
    (r"v5 ?lite|v5e", "TPU v5e", 819.0),
    (r"v5p|tpu v5\b", "TPU v5p", 2765.0),
    (r"tpu v4\b", "TPU v4", 1228.0),
)


def lookup(table, device_kind: str):
    """(name, value) of the first row whose pattern is found in device_kind, else (None, None)."""
    kind = device_kind.lower()
    for pattern, name, value in table:
        if re.search(pattern, kind):
            return name, value
    return None, None


def hbm_gbps(device=None):
    """(name, GB/s) of the device's HBM bandwidth, (None, None) when unknown (CPU included)."""
    device = device or jax.devices()[0]
    if device.platform == "cpu":
        return None, None
    return lookup(PEAK_HBM_GBPS, device.device_kind)
