"""Copy a trained adapter into the package (fp16), recording the recipe.

    python examples/ship_adapter.py --adapter-path runs/adapter_k4 \
        --out mlx_mtp/adapters/smollm2-135m-instruct --recipe '{"script": "examples/train_default_adapter.sh"}'
"""

import argparse
import json
from dataclasses import replace

import mlx.core as mx

from mlx_mtp.adapter import read_adapter_config, save_adapter
from mlx_mtp.loading import load


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="base model (default: the default model)")
    p.add_argument("--adapter-path", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    p.add_argument("--recipe", default="{}", help="JSON merged into the adapter's recipe")
    p.add_argument(
        "--decode-num-masks",
        default=None,
        help="default k per device type, e.g. 'cpu=2' (from the benchmark's projection)",
    )
    args = p.parse_args()
    model, _, state = load(args.model, adapter_path=args.adapter_path, return_state=True)
    if args.decode_num_masks:
        pairs = dict(item.split("=") for item in args.decode_num_masks.split(","))
        model.config = replace(model.config, decode_num_masks={d: int(k) for d, k in pairs.items()})
    recipe = read_adapter_config(args.adapter_path).get("recipe", {})
    recipe.update(json.loads(args.recipe))
    datastore = None if state.datastore is None else state.datastore.storage()
    save_adapter(model, args.out, recipe=recipe, dtype=getattr(mx, args.dtype), datastore=datastore)
    print(f"wrote {args.out} ({args.dtype})")


if __name__ == "__main__":
    main()
