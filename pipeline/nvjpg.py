"""How busy the GPU's hardware JPEG decoder (NVJPG) is: the figure that says whether
`hw_decoder_load` sends it the right share (DALI's `mixed` decoder splits each batch between
it and nvJPEG's CUDA path).

NVML reports it per device (`nvmlDeviceGetJpgUtilization`: the percent of the last sampling
period in which any NVJPG engine was busy; DCGM's NVJPG0-7 fields break it down per engine).
The device is found by UUID, so the figure is the worker's own GPU whatever
CUDA_VISIBLE_DEVICES maps it to. On a CPU worker, without NVML, or on a GPU without NVJPG
engines, `read()` is None and nothing is raised.
"""
from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


class NvjpgMeter:
    """`read()`: the hardware JPEG decoder's utilisation of this worker's GPU, 0..1, or None."""

    def __init__(self, device: torch.device) -> None:
        self._handle = None
        if device.type != "cuda":
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            uuid = str(torch.cuda.get_device_properties(device).uuid)
            name = uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}"
            self._handle = pynvml.nvmlDeviceGetHandleByUUID(name.encode())
            pynvml.nvmlDeviceGetJpgUtilization(self._handle)  # NVML_ERROR_NOT_SUPPORTED: no NVJPG here
        except Exception as err:  # no NVML library, an old driver, a GPU without NVJPG: not measured
            log.info("NVJPG utilisation not measured on %s: %s", device, " ".join(str(err).split())[:120])
            self._handle = None

    def read(self) -> float | None:
        if self._handle is None:
            return None
        import pynvml

        try:
            percent, _period_us = pynvml.nvmlDeviceGetJpgUtilization(self._handle)
        except pynvml.NVMLError:
            return None
        return percent / 100.0
