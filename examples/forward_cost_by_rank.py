"""What the gated LoRA's rank costs when decoding: one forward over T new
tokens through the gated path for each rank (the benchmark's shapes: one
token, one token with k masks, the quadratic steps with j = 1..k masks; 300
cached tokens), relative to the plain one-token forward of the same model.

    python examples/forward_cost_by_rank.py [--model M] [--ranks 4,8,16,32,64,128] [--num-masks 4]

On Linux, mlx_mtp loads an installed OpenBLAS itself (mlx_mtp.blas). Its figures are in
docs/benchmarks.md ("Which rank"). The weights' values do not
change the cost, so fresh (untrained) adapters are timed.
"""

import argparse

from mlx_mtp.benchmark import step_shapes
from mlx_mtp.blas import blas_info
from mlx_mtp.calibration.measure import fill_cache, forward_cost
from mlx_mtp.calibration.store import weights_dtype
from mlx_mtp.loading import default_model_path, load_base
from mlx_mtp.model.gated_lora import LoRAConfig
from mlx_mtp.model.mtp_model import MTPConfig, MTPModel


def forward_costs(model, shapes, repeats, context=300):
    """Seconds per forward over T = n(j+1) new tokens (n tokens with j masks
    each), keyed by T: calibration's own timing."""
    widths = {n * (j + 1): j > 0 for n, j in shapes}
    cache = fill_cache(model, context, max(widths))
    return {T: forward_cost(model, cache, T, gated, repeats) for T, gated in sorted(widths.items())}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="mlx-lm model (default: the default model)")
    p.add_argument("--ranks", default="4,8,16,32,64,128")
    p.add_argument("--num-masks", type=int, default=4)
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args(argv)
    path = str(args.model or default_model_path())

    def fresh(config=None) -> MTPModel:
        # MTPModel installs LoRA into the base model: each rank gets its own load
        base, _ = load_base(path)
        return MTPModel(base, config)

    plain_model = fresh()
    plain = forward_costs(plain_model, [(1, 0)], repeats=args.repeats)[1]
    print(f"BLAS: {blas_info().name}, weights: {weights_dtype(plain_model.model)}; plain T=1: {plain * 1e3:.1f} ms")
    k = args.num_masks
    for rank in [int(r) for r in args.ranks.split(",")]:
        model = fresh(MTPConfig(num_masks=k, lora=LoRAConfig(rank=rank)))
        costs = forward_costs(model, step_shapes(k), repeats=args.repeats)
        line = ", ".join(f"T={T}: {c * 1e3:.1f} ms ({c / plain:.2f}x)" for T, c in sorted(costs.items()))
        print(f"rank {rank:4d}: {line}", flush=True)


if __name__ == "__main__":
    main()
