"""``mllm-pib cache``: store the frozen backbone's outputs for PIB training."""

from __future__ import annotations


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "cache",
        help="precompute frozen-backbone features for PIB training",
        description="Run the frozen backbone once over a training config's data and store what PIB "
        "training reads (hidden states at the positions the PIB uses, its vision features, reference "
        "log-probs) in sharded safetensors. Train on it with `feature_cache: DIR` in the config.",
    )
    parser.add_argument("--config", required=True, help="the training config whose data to cache")
    parser.add_argument("--backbone", help="backbone name; overrides the config's `backbone`")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value")
    parser.add_argument("--out", required=True, help="cache directory (replaced atomically)")
    parser.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default="float16",
                        help="storage type of hidden states and vision features (default float16)")
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per backbone pass (default 8)")
    parser.add_argument("--shard-size", type=int, default=1024, help="pairs per shard file (default 1024)")
    parser.set_defaults(handler=run)


def run(args) -> int:
    from mllm_pib.config import load_config
    from mllm_pib.training.feature_cache import build_cache

    overrides = list(args.overrides) + ([f"backbone={args.backbone}"] if args.backbone else [])
    config = load_config(args.config, overrides)
    build_cache(config, args.out, dtype=args.dtype, batch_size=args.batch_size, shard_size=args.shard_size)
    return 0
