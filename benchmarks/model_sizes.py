"""Print the parameter / MAC table of every registry model as Markdown (models are built on the meta device).

    python benchmarks/model_sizes.py [--size 224] [--num-classes 1000]
    python benchmarks/model_sizes.py --segmentation    # the mmseg configs (19 classes, 1024x2048 input)
"""
from __future__ import annotations

import argparse
import sys
import time

# Published numbers (1000 classes, 224x224): params (M), GFLOPs.
PUBLISHED = {
    "rednet26": (9.23, 1.73), "rednet38": (12.39, 2.22), "rednet50": (15.54, 2.71),
    "rednet101": (25.65, 4.74), "rednet152": (33.99, 6.79),
    "cednet38": (12.40, 2.2), "cednet50": (16.3, 2.9), "resnet50": (25.56, 4.1),
}


# Published Cityscapes numbers (official repository, mmseg 0.x): params (M), GFLOPs at 1024x2048.
PUBLISHED_SEG = {
    "fpn_rednet50_4xb2-80k_cityscapes-512x1024.py": (18.5, 293.9),
    "fpn_rednet50_inv-fpn_4xb2-80k_cityscapes-512x1024.py": (16.4, 205.2),
    "upernet_rednet50_4xb2-80k_cityscapes-512x1024.py": (56.4, 1825.6),
}


def segmentation_table() -> None:
    """Every shipped segmentation config: params (auxiliary head included) and inference GMACs."""
    import warnings

    from workloads.segmentation.mmcfg import list_configs, model_size

    warnings.filterwarnings("ignore", category=UserWarning)  # mmseg's deprecation notes, once per model
    print("| config | params (M) | GFLOPs (MACs) at 1024x2048 | published params / GFLOPs |")
    print("| --- | ---: | ---: | --- |")
    for name in list_configs():
        t0 = time.perf_counter()
        params, macs = model_size(name, (1024, 2048))
        pub = PUBLISHED_SEG.get(name)
        pub_s = f"{pub[0]} / {pub[1]}" if pub else ""
        print(f"| {name} | {params / 1e6:.2f} | {macs / 1e9:.1f} | {pub_s} |")
        print(f"  {name}: {time.perf_counter() - t0:.1f}s", file=sys.stderr)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=224, help="input height and width (default 224)")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--segmentation", action="store_true",
                   help="the segmentation configs instead of the registry models (needs mmseg)")
    args = p.parse_args(argv)
    if args.segmentation:
        segmentation_table()
        return 0

    import torch

    from workloads.models import build_model, count_flops, count_params, list_models

    print(f"| model | params (M) | GFLOPs (MACs) at {args.size}x{args.size} | published params / GFLOPs |")
    print("| --- | ---: | ---: | --- |")
    for name in list_models():
        t0 = time.perf_counter()
        with torch.device("meta"):
            model = build_model(name, num_classes=args.num_classes)
        params = count_params(model) / 1e6
        gmacs = count_flops(model, (1, 3, args.size, args.size)) / 1e9
        pub = PUBLISHED.get(name)
        pub_s = f"{pub[0]} / {pub[1]}" if pub and args.size == 224 and args.num_classes == 1000 else ""
        print(f"| {name} | {params:.2f} | {gmacs:.2f} | {pub_s} |")
        print(f"  {name}: {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
