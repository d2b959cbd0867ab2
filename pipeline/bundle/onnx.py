"""ONNX members: each fold model exported for onnxruntime and run as a torch module, so TTA, scales and
merging stay the predict stage's own."""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.errors import UserError

INPUT, OUTPUT = "images", "logits"
OPSET = 17


def export_onnx(model: nn.Module, example_hw: tuple[int, int], path: Path) -> None:
    """Write `model` (eval mode, CPU) as an ONNX graph with batch, height and width left free.

    torch's TorchScript-based exporter traces the model on one (1, 3, H, W) example; smp's decoders
    take their upsampling sizes from tensor shapes, which the trace records as shape operations, so the
    graph takes any size a checkpoint's geometry allows (multiples of 32). A model the exporter cannot
    trace is a UserError naming `path`.
    """
    example = torch.zeros(1, 3, *example_hw)
    free = {0: "batch", 2: "height", 3: "width"}
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings():
            # The TorchScript exporter is deprecated in favour of torch.export's; that one needs onnxscript
            # and explicit shape constraints per architecture. This one handles every smp model here.
            warnings.simplefilter("ignore", (DeprecationWarning, FutureWarning, torch.jit.TracerWarning))
            torch.onnx.export(
                model.eval(),
                (example,),
                buffer,
                input_names=[INPUT],
                output_names=[OUTPUT],
                dynamic_axes={INPUT: free, OUTPUT: free},
                opset_version=OPSET,
                dynamo=False,
            )
    except Exception as exc:  # the exporter raises many types; the user needs the model and the reason
        raise UserError(f"{path}: this model does not export to ONNX ({type(exc).__name__}: {exc})") from None
    path.write_bytes(buffer.getvalue())


CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"  # onnxruntime-gpu only


class OnnxModel(nn.Module):
    """An ONNX graph run by onnxruntime, called like the torch model it was exported from: (B, 3, H, W)
    float32 images in, (B, C, H, W) logits out, on the images' device. `provider`: CPU, or CUDA where
    onnxruntime-gpu provides it (a UserError where it does not)."""

    def __init__(self, path: Path, threads: int, provider: str = CPU) -> None:
        super().__init__()
        ort = _onnxruntime()
        if provider not in ort.get_available_providers():
            raise UserError(
                f"{path}: onnxruntime here has no {provider} (installed: {ort.get_available_providers()})"
            )
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), options, providers=[provider])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(images.detach().float().cpu().numpy())
        (logits,) = self.session.run([OUTPUT], {INPUT: array})
        return torch.from_numpy(logits).to(images.device)


def _onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise UserError(
            "--engine onnx needs onnxruntime: pip install onnxruntime (or trashseg[onnx])"
        ) from None
    return onnxruntime
