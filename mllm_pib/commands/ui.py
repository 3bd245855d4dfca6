"""``mllm-pib ui``: a web page showing the base model's and the PIB model's answers side by side."""

from __future__ import annotations

import argparse

from mllm_pib.commands.generate import add_decoding_arguments, decoding_options, require_pib
from mllm_pib.commands.options import add_model_arguments, load_model_from_args
from mllm_pib.errors import UserError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "ui",
        help="web demo: base vs PIB answers about an uploaded image (needs the ui extra)",
        description="Serve a page where an image is uploaded and a question asked (or a description "
        "requested); the base model's and the PIB model's answers are shown side by side. With "
        "--annotations and/or --pope-questions, object words are marked when they are (not) in the "
        "image, the uploaded file being matched by name (without extension). Needs `pip install "
        "'mllm-pib[ui]'`.",
    )
    add_model_arguments(parser)
    parser.add_argument("--annotations", metavar="FILE",
                        help="objects per image: JSON lines of {\"image\", \"objects\"} or COCO instances_*.json")
    parser.add_argument("--pope-questions", metavar="FILE",
                        help="labelled POPE questions ({\"image\", \"text\", \"label\"} records)")
    add_decoding_arguments(parser)
    parser.add_argument("--host", default=DEFAULT_HOST,
                        help=f"address to bind (default: {DEFAULT_HOST}, this machine only; 0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default: {DEFAULT_PORT})")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise UserError("the web demo needs Gradio: pip install 'mllm-pib[ui]'") from None
    from mllm_pib.ui import Demo, ObjectIndex, build_app, serve

    if not 0 < args.port < 65536:
        raise UserError(f"--port must be between 1 and 65535, got {args.port}")
    options = decoding_options(args)
    require_pib(args, "the web demo")
    objects = None
    if args.annotations or args.pope_questions:
        objects = ObjectIndex.load(args.annotations, args.pope_questions)
    demo = Demo(load_model_from_args(args), options, objects)
    serve(build_app(demo), args.host, args.port)
    return 0
