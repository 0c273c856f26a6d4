"""The machine the console runs jobs on: CPU, memory, the disk of its home folder (psutil), and each GPU's model,
memory and utilisation (NVML, through nvidia-ml-py, where a driver is present: "no GPU" otherwise). Jobs ask for
devices (GPUs and a number of processes); `check` holds them against what the machine has at creation."""

from __future__ import annotations

import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

# commands that run under torchrun when they ask for more than one process (the others are one process)
DISTRIBUTED = ("finetune", "pretrain", "distill")
# commands that can use a GPU (prepare tokenises on the CPU; export runs ONNX Runtime on the CPU)
GPU_COMMANDS = ("finetune", "pretrain", "distill", "sweep")


@dataclass
class Gpu:
    index: int
    name: str
    memory_total: int = 0
    memory_used: int = 0
    utilization: int | None = None  # percent, over the driver's last sample period


class Machine:
    """What this machine has, read on demand (NVML once opened is kept; a machine without it has no GPU)."""

    def __init__(self, home: Path, gpus: list[Gpu] | None = None):
        self.home = home
        self._fixed = gpus  # tests: a stated inventory instead of NVML
        self._nvml: bool | None = None
        self._lock = threading.Lock()
        try:
            import psutil

            psutil.cpu_percent(interval=None)  # the first call only starts the measurement
        except ImportError:
            pass

    def _nvml_ready(self) -> bool:
        with self._lock:
            if self._nvml is None:
                try:
                    import pynvml

                    pynvml.nvmlInit()
                    self._nvml = True
                except Exception:  # noqa: BLE001 - no package, no driver, no device: no GPU
                    self._nvml = False
            return self._nvml

    def gpus(self) -> list[Gpu]:
        if self._fixed is not None:
            return list(self._fixed)
        if not self._nvml_ready():
            return []
        import pynvml

        out = []
        try:
            for i in range(pynvml.nvmlDeviceGetCount()):
                handle = pynvml.nvmlDeviceGetHandleByIndex(i)
                name = pynvml.nvmlDeviceGetName(handle)
                memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
                try:
                    utilization = int(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
                except pynvml.NVMLError:
                    utilization = None
                out.append(
                    Gpu(
                        i,
                        name.decode() if isinstance(name, bytes) else str(name),
                        int(memory.total),
                        int(memory.used),
                        utilization,
                    )
                )
        except pynvml.NVMLError:
            return out
        return out

    def gpu_count(self) -> int:
        if self._fixed is not None:
            return len(self._fixed)
        if not self._nvml_ready():
            return 0
        import pynvml

        try:
            return int(pynvml.nvmlDeviceGetCount())
        except pynvml.NVMLError:
            return 0

    def cpu_count(self) -> int:
        return os.cpu_count() or 1

    def snapshot(self) -> dict:
        """Everything the resources page and the job pages show, as JSON."""
        try:
            import psutil

            memory = psutil.virtual_memory()
            cpu = {
                "cores": self.cpu_count(),
                "percent": psutil.cpu_percent(interval=None),
                "load": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
            }
            ram = {"total": memory.total, "used": memory.total - memory.available, "percent": memory.percent}
        except ImportError:
            cpu = {"cores": self.cpu_count(), "percent": None, "load": list(os.getloadavg())}
            ram = None
        disk = shutil.disk_usage(self.home)
        return {
            "cpu": cpu,
            "memory": ram,
            "disk": {
                "path": str(self.home),
                "total": disk.total,
                "used": disk.used,
                "free": disk.free,
                "percent": round(100 * disk.used / disk.total, 1),
            },
            "gpus": [vars(g) for g in self.gpus()],
        }


def check(machine: Machine, command: str, gpus: list[int] | None, processes: int) -> dict[str, str]:
    """The devices a job asks for against the machine: {"gpus" | "processes": message} for each problem."""
    errors: dict[str, str] = {}
    have = machine.gpu_count()
    if processes < 1:
        errors["processes"] = f"processes = {processes} is out of range [1, inf]"
    elif processes > 1 and command not in DISTRIBUTED:
        errors["processes"] = (
            f"a {command} job runs as one process; more than one is for finetune, pretrain and distill"
        )
    if gpus is not None and len(set(gpus)) != len(gpus):
        errors["gpus"] = f"GPUs {gpus} name one twice"
    elif gpus and command not in GPU_COMMANDS:
        errors["gpus"] = f"a {command} job runs on the CPU"
    elif gpus:
        missing = [g for g in gpus if not 0 <= g < have]
        if missing:
            errors["gpus"] = f"GPU {', '.join(map(str, missing))} is not on this machine " + (
                f"(it has {have}: {', '.join(map(str, range(have)))})" if have else "(it has no GPU)"
            )
        elif processes > 1 and processes != len(gpus):
            errors.setdefault(
                "processes", f"{len(gpus)} GPU(s) run {len(gpus)} process(es), one per GPU, not {processes}"
            )
    elif gpus is None and have and command in GPU_COMMANDS and processes > have:
        errors.setdefault(
            "processes", f"{processes} processes need {processes} GPUs, one each; this machine has {have}"
        )
    elif (gpus == [] or not have) and processes > machine.cpu_count():
        errors.setdefault(
            "processes", f"{processes} processes on the CPU: this machine has {machine.cpu_count()} cores"
        )
    return errors


def wanted(job, gpu_count: int) -> int:
    """How many GPUs a job takes when it starts: those it named, else (any free ones) one per process."""
    if job.gpus is not None:
        return len(job.gpus)
    return max(1, job.processes) if gpu_count and job.command in GPU_COMMANDS else 0
