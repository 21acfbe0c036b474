"""Resource planning on one machine: CPUs and GPUs per trial and how many trials run at once
(search.cluster does the same for a Ray cluster, once connected)."""
from __future__ import annotations

from datasets.defaults import usable_cpus
from datasets.errors import UserError


def local_hardware() -> tuple[int, int]:
    """(CPUs usable by this process, CUDA GPUs). device_count() uses NVML and creates no CUDA context."""
    cpus = usable_cpus()
    try:
        import torch

        gpus = torch.cuda.device_count()
    except Exception:
        gpus = 0
    return cpus, gpus


def resource_defaults(args, cpus: int, gpus: int, num_samples: int, where: str = "this machine"
                      ) -> tuple[float, float, int]:
    """cpus/gpus per trial and concurrency: share GPUs two trials each (96 px nets leave a GPU idle), and give
    each trial an equal slice of the CPUs (data feeding) without exceeding what the machine has."""
    gpt = args.gpus_per_trial if args.gpus_per_trial is not None else (0.5 if gpus else 0.0)
    if gpt > gpus:
        raise UserError(f"--gpus-per-trial {gpt} but {where} has {gpus} GPU(s); "
                        f"use at most {gpus}{' (or 0 for CPU)' if gpus else ' (train on CPU)'}")
    if gpt > 1 and gpt != int(gpt):
        raise UserError(f"--gpus-per-trial {gpt}: above 1 it must be a whole number of GPUs")
    slots = int(gpus // gpt) if gpt else None
    if args.max_concurrent is not None:
        conc = args.max_concurrent
    elif slots:
        conc = max(1, slots)
    else:
        cpt0 = args.cpus_per_trial or (1 if cpus <= 4 else 2)
        conc = max(1, int(cpus // cpt0))
    conc = max(1, min(conc, num_samples))
    cpt = args.cpus_per_trial if args.cpus_per_trial is not None else max(1, cpus // conc)
    if cpt > cpus:
        raise UserError(f"--cpus-per-trial {cpt} but {where} has {cpus} CPU(s)")
    return float(cpt), float(gpt), conc
