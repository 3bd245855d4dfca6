"""``mllm-pib cache``: store the frozen backbone's outputs for PIB training."""

from __future__ import annotations

from mllm_pib.commands.options import add_output_arguments, output_dir


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "cache",
        help="precompute frozen-backbone features for PIB training",
        description="Run the frozen backbone once over a training config's data and store what PIB "
        "training reads (hidden states at the positions the PIB uses, its vision features, reference "
        "log-probs) in sharded safetensors. Train on it with `feature_cache: DIR` in the config. The "
        "cache appears in the output folder whole or not at all.",
    )
    parser.add_argument("--config", required=True, metavar="FILE", help="the training config whose data to cache")
    parser.add_argument("--backbone", help="backbone name (default: the config's `backbone`, else the backbone "
                        "registering the model_type of the config's model/config.json)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value")
    add_output_arguments(parser, "the cache")
    parser.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default="float16",
                        help="storage type of hidden states and vision features")
    parser.add_argument("--batch-size", type=int, default=8, metavar="N", help="pairs per backbone pass")
    parser.add_argument("--shard-size", type=int, default=1024, metavar="N", help="pairs per shard file")
    parser.set_defaults(handler=run)


def run(args) -> int:
    from mllm_pib.config import load_config
    from mllm_pib.training.feature_cache import build_cache

    out = output_dir(args)
    overrides = list(args.overrides) + ([f"backbone={args.backbone}"] if args.backbone else [])
    config = load_config(args.config, overrides)
    build_cache(config, out, dtype=args.dtype, batch_size=args.batch_size, shard_size=args.shard_size,
                overwrite=args.overwrite)
    return 0
