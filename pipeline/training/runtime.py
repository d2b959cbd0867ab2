"""Device, precision, seeding and DDP process group: decided once per run and passed around."""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from pipeline.config import RuntimeParams, TrainParams, split_endpoint
from pipeline.errors import UserError
from pipeline.writer import death_signal_preexec


@dataclass(frozen=True)
class Runtime:
    """Where and how this process trains. rank/world_size are 0/1 outside torchrun."""

    device: torch.device
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    amp_dtype: torch.dtype | None = None  # None: full float32
    use_scaler: bool = False  # float16 needs loss scaling; bfloat16 has float32's range and does not
    channels_last: bool = False

    @property
    def is_main(self) -> bool:
        """Only the main process writes files and prints progress."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def autocast(self) -> contextlib.AbstractContextManager[object]:
        """Mixed-precision context for forward passes (a no-op in float32)."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def execution(self) -> dict[str, object]:
        """How this process computes, as far as it shapes the weights: device type, autocast precision,
        memory format (part of the resume fingerprint)."""
        amp = "float32" if self.amp_dtype is None else str(self.amp_dtype).removeprefix("torch.")
        return {"device": self.device.type, "amp": amp, "channels_last": self.channels_last}

    def to_device(self, images: torch.Tensor) -> torch.Tensor:
        """Move an NCHW float batch to the device in the memory format the model runs in."""
        memory_format = torch.channels_last if self.channels_last else torch.preserve_format
        return images.to(self.device, non_blocking=True, memory_format=memory_format)


def setup_runtime(train: TrainParams, num_workers: int = 0, device: str | None = None) -> Runtime:
    """Read torchrun's RANK/LOCAL_RANK/WORLD_SIZE, pick the device, join the process group if > 1 process.

    `device` forces a device ("cpu", "cuda"); by default CUDA is used when available. AMP and
    channels_last follow `train.amp` / `train.channels_last` on CUDA. On a CPU both follow
    `train.cpu_bf16`, and only where the CPU computes bf16 natively: there bf16 autocast with
    channels_last trains about 2x as many steps per minute as float32; elsewhere bf16 is emulated and
    slower than float32, so such a CPU runs float32 (with a note). On CPU, torch's
    thread count shares this node's cores among its processes (torchrun's LOCAL_WORLD_SIZE) and leaves a
    core per DataLoader worker (`num_workers`), unless OMP_NUM_THREADS says otherwise.
    """
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    world_size = _env_int("WORLD_SIZE", 1)
    # Processes on other nodes do not share this node's cores.
    local_world_size = _env_int("LOCAL_WORLD_SIZE", world_size)
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    amp_dtype = None
    channels_last = use_cuda and train.channels_last
    if use_cuda:
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
        if train.amp:
            amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        # TF32 matmuls: free speed on Ampere+ at a precision segmentation does not miss (cuDNN
        # convolutions use TF32 by default). Fixed input sizes let cuDNN benchmark its algorithms once.
        torch.set_float32_matmul_precision("high")
        torch.backends.cudnn.benchmark = True
    else:
        dev = torch.device("cpu")
        if train.cpu_bf16:
            if cpu_has_native_bf16():
                amp_dtype, channels_last = torch.bfloat16, True
            elif rank == 0:
                print(
                    "note: train.cpu_bf16 is on, but this CPU has no native bf16 (AVX512-BF16 or AMX), "
                    "where bf16 is emulated and slower: training in float32",
                    file=sys.stderr,
                )
        if "OMP_NUM_THREADS" not in os.environ:
            # Leave each DataLoader worker a core: OpenMP threads sharing cores with busy processes
            # wait on each other at every op and run several times slower than fewer threads would.
            torch.set_num_threads(max(1, cpu_cores() // local_world_size - num_workers))
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", device_id=dev if use_cuda else None)
    return Runtime(
        device=dev,
        rank=rank,
        local_rank=local_rank,
        world_size=world_size,
        amp_dtype=amp_dtype,
        use_scaler=amp_dtype == torch.float16,
        channels_last=channels_last,
    )


def read_cpuinfo() -> str:
    """The text of /proc/cpuinfo, "" where it cannot be read (not Linux)."""
    try:
        with open("/proc/cpuinfo") as handle:
            return handle.read()
    except OSError:
        return ""


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU computes bf16 in hardware: the avx512_bf16 or amx_bf16 flag of /proc/cpuinfo
    (`cpuinfo`: its text, for tests; read here when None). False where it cannot be read."""
    if cpuinfo is None:
        cpuinfo = read_cpuinfo()
    return re.search(r"\b(avx512_bf16|amx_bf16)\b", cpuinfo) is not None


def under_torchrun() -> bool:
    """Whether this process is one of torchrun's workers (torchrun sets LOCAL_RANK for each)."""
    return "LOCAL_RANK" in os.environ


@dataclass(frozen=True)
class NodeSpec:
    """This machine's place in a multi-node DDP run: node `node_rank` of `nnodes`, node 0 at host:port."""

    nnodes: int
    node_rank: int
    host: str
    port: int


def resolve_nodes(runtime: RuntimeParams, environ: Mapping[str, str]) -> NodeSpec | None:
    """The node settings of a multi-node run (None for runtime.nnodes 1), from params and `environ`.

    Node 0's endpoint: TRASHSEG_RDZV_ENDPOINT, else runtime.rdzv_endpoint. This node's rank:
    TRASHSEG_NODE_RANK, else SLURM_NODEID (what srun sets on each node).
    """
    nnodes = runtime.nnodes
    if nnodes == 1:
        return None
    endpoint = environ.get("TRASHSEG_RDZV_ENDPOINT", runtime.rdzv_endpoint)
    if endpoint is None:
        raise UserError(
            f"params: runtime.nnodes is {nnodes} but no rendezvous endpoint: set runtime.rdzv_endpoint "
            "(host:port of node 0) or TRASHSEG_RDZV_ENDPOINT"
        )
    address = split_endpoint(endpoint)
    if address is None:  # runtime.rdzv_endpoint was checked at load; the environment was not
        raise UserError(
            "environment: TRASHSEG_RDZV_ENDPOINT must be host:port of node 0 (port 1-65535), "
            f"got {endpoint!r}"
        )
    rank = node_rank(nnodes, environ)
    return NodeSpec(nnodes=nnodes, node_rank=rank, host=address[0], port=address[1])


def node_rank(nnodes: int, environ: Mapping[str, str]) -> int:
    """This machine's node rank in a run of `nnodes`: TRASHSEG_NODE_RANK, else SLURM_NODEID (srun's)."""
    name = next((n for n in ("TRASHSEG_NODE_RANK", "SLURM_NODEID") if n in environ), None)
    if name is None:
        raise UserError(
            f"params: runtime.nnodes is {nnodes} but this node's rank is unknown: set TRASHSEG_NODE_RANK "
            "(0 on node 0) or run the stage under srun, which sets SLURM_NODEID"
        )
    rank = _env_int(name, 0, environ)
    if not 0 <= rank < nnodes:
        raise UserError(
            f"environment: {name} is {rank} but runtime.nnodes is {nnodes} (node ranks 0..{nnodes - 1})"
        )
    return rank


def launch_workers(nproc: int, argv: list[str], nodes: NodeSpec | None = None) -> int:
    """Run `python argv...` as `nproc` DDP workers under torchrun on this machine; returns its exit code.

    With `nodes`, this machine's workers join those of the other nodes (each running the same command)
    at node 0's endpoint; without, they are the whole run. Stages launch their own workers, rather than
    dvc.yaml wrapping them in torchrun, so a one-process run stays a plain process whose user errors
    print one line (torchrun adds its own traceback to any worker's failure).
    """
    command = [sys.executable, "-m", "torch.distributed.run"]
    if nodes is None:
        command += ["--standalone", "--nproc_per_node", str(nproc)]
    else:
        # Static rendezvous: global ranks follow node ranks, so node 0 holds rank 0 (the one that writes
        # files), where the dynamic c10d one ranks nodes in the order they happen to join.
        command += [
            "--rdzv_backend", "static", "--nnodes", str(nodes.nnodes), "--node_rank", str(nodes.node_rank),
            "--nproc_per_node", str(nproc), "--master_addr", nodes.host, "--master_port", str(nodes.port),
        ]  # fmt: skip
    # torchrun dies with this launcher however it dies (its workers, in turn, with torchrun).
    proc = subprocess.Popen([*command, *argv], preexec_fn=death_signal_preexec)
    # A SIGTERM meant for this stage (`kill`, a scheduler, a cancelled job) must stop torchrun too, or
    # its workers would go on writing the fold's checkpoints behind a stage already reported failed.
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: proc.send_signal(signum))
    try:
        return proc.wait()
    except BaseException:  # Ctrl-C (KeyboardInterrupt) and anything else: never leave the workers behind
        proc.terminate()
        proc.wait()
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)


def teardown(runtime: Runtime) -> None:
    """Leave the process group (if this run joined one)."""
    if runtime.distributed and dist.is_initialized():
        dist.destroy_process_group()


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def cpu_cores() -> int:
    """Cores this process may run on (its affinity mask, which containers and taskset narrow)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _env_int(name: str, default: int, environ: Mapping[str, str] = os.environ) -> int:
    value = environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise UserError(f"environment: {name} must be an integer, got {value!r}") from None
