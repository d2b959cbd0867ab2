"""Benchmark: one CPU training step (float32, bf16 autocast, channels_last, AdamW fused) on one core."""

from __future__ import annotations

import argparse
import contextlib

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F

from harness import median_seconds, pin_to_one_core


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--classes", type=int, default=8)
    parser.add_argument("--decoder", type=int, nargs=5, help="decoder_channels (default: smp's)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--float32-only", action="store_true", help="skip bf16 (minutes a step where the CPU emulates it)"
    )
    args = parser.parse_args()
    pin_to_one_core()
    torch.manual_seed(0)
    x = torch.randn(args.batch_size, 3, args.size, args.size)
    y = torch.randint(0, args.classes, (args.batch_size, args.size, args.size))
    decoder = {} if args.decoder is None else {"decoder_channels": args.decoder}

    def step_fn(bf16: bool, channels_last: bool, fused: bool = False) -> object:
        model = smp.Unet("resnet18", encoder_weights=None, classes=args.classes, **decoder)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        model = model.to(memory_format=fmt).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=fused)
        images = x.to(memory_format=fmt)

        def step() -> None:
            cast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
            with cast:
                loss = F.cross_entropy(model(images).float(), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

        return step

    variants = {
        "float32": step_fn(False, False),
        "float32 channels_last": step_fn(False, True),
        # What the pipeline's train state uses: AdamW's fused kernel, one pass over the parameters.
        "float32 AdamW fused": step_fn(False, False, fused=True),
    }
    if not args.float32_only:
        variants["bf16 autocast"] = step_fn(True, False)
        variants["bf16 autocast channels_last"] = step_fn(True, True)
    seconds = median_seconds(variants, args.repeats)
    base = seconds["float32"]
    print(f"one training step, Unet/ResNet-18, batch {args.batch_size} at {args.size} px, one core:")
    for name, s in seconds.items():
        print(f"  {name:<28} {s * 1000:8.1f} ms  ({base / s:.2f}x float32)")
    # The optimiser step alone, where fusing acts: AdamW over the same gradients, looped over the
    # parameter tensors (torch's CPU default) or fused.
    model = smp.Unet("resnet18", encoder_weights=None, classes=args.classes, **decoder).train()
    F.cross_entropy(model(x), y).backward()
    optimizers = {
        "AdamW step, looped": torch.optim.AdamW(model.parameters(), lr=1e-3),
        "AdamW step, fused": torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True),
    }
    steps = median_seconds({name: opt.step for name, opt in optimizers.items()}, args.repeats * 4)
    looped = steps["AdamW step, looped"]
    for name, s in steps.items():
        print(f"  {name:<28} {s * 1000:8.1f} ms  ({looped / s:.2f}x looped)")
    if "bf16 autocast" in seconds:
        print(f"bf16 autocast vs float32: {base / seconds['bf16 autocast']:.2f}x")


if __name__ == "__main__":
    main()
