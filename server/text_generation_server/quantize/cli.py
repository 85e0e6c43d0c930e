"""`text-generation-server quantize` and `text-generation-server perplexity`.

``register(subparsers)`` adds both subcommands to the server's CLI; this
module also runs standalone: ``python -m text_generation_server.quantize.cli``.
Each subcommand's function returns the process exit code.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path

from loguru import logger

from text_generation_server.quantize.data import BUILTIN_DATASET, HUB_DATASETS_INSTALL
from text_generation_server.quantize.packing import SUPPORTED_BITS
from text_generation_server.utils.argtypes import integer, non_negative_int, number, positive_int
from text_generation_server.utils.log import setup_logging


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults and wraps help at spaces only, so names like text-generation-server and
    python-docs stay whole (and a command in the help can be copied)."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return textwrap.fill(
            " ".join(text.split()), width, initial_indent=indent, subsequent_indent=indent, break_on_hyphens=False
        )


def _group_size(value: str) -> int:
    size = integer(value)
    if size != -1 and size < 1:
        raise argparse.ArgumentTypeError(
            f"{size} is not allowed: use a positive group size (input columns per group, e.g. 32, 64 or 128) "
            "or -1 (one group per row)"
        )
    return size


def _percdamp(value: str) -> float:
    p = number(value)
    if not 0.0 <= p <= 1.0:
        raise argparse.ArgumentTypeError(f"{p} must lie in [0, 1] (a fraction of the mean Hessian diagonal)")
    return p


def _bits(value: str) -> int:
    try:
        b = int(value)
    except ValueError:
        b = -1
    if b not in SUPPORTED_BITS:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not supported; choose one of {', '.join(map(str, SUPPORTED_BITS))}"
        )
    return b


def add_quantize_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_id", metavar="MODEL_ID",
                   help="local checkpoint directory, hub id in the local HF cache, or 'default' for the built-in model")
    p.add_argument("output_dir", metavar="OUTPUT_DIR", type=Path, help="where the GPTQ checkpoint is written")
    p.add_argument("--revision", default=None, help="hub revision of MODEL_ID")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model repository's own config code")
    p.add_argument("--upload-to-model-id", default=None, metavar="REPO_ID",
                   help="push the finished checkpoint to this hub repository")
    p.add_argument("--percdamp", type=_percdamp, default=0.01,
                   help="dampening added to the Hessian diagonal, as a fraction of its mean (raised automatically if needed)")
    p.add_argument("--act-order", action="store_true",
                   help="quantize columns by decreasing activation energy (desc_act; g_idx becomes non-monotonic)")
    p.add_argument("--groupsize", type=_group_size, default=128,
                   help="input columns per quantization group; a layer whose width it does not divide gets "
                        "ceil(width / groupsize) groups, the last one shorter (the AutoGPTQ layout); "
                        "-1 for one group per row")
    p.add_argument("--bits", type=_bits, default=4, help=f"bits per weight, one of {', '.join(map(str, SUPPORTED_BITS))}")
    p.add_argument("--sym", action=argparse.BooleanOptionalAction, default=True,
                   help="symmetric quantization grid (--no-sym: asymmetric with a per-group zero point)")
    p.add_argument("--group-aware-order", action=argparse.BooleanOptionalAction, default=True,
                   help="without --act-order: visit whole groups in order of activity (and the columns inside "
                        "each group too); the checkpoint keeps the plain layout (desc_act false, monotonic g_idx). "
                        "--no-group-aware-order gives the original column order")
    p.add_argument("--static-groups", action="store_true",
                   help="fit group grids before act-order reordering, keeping g_idx monotonic")
    p.add_argument("--true-sequential", action=argparse.BooleanOptionalAction, default=True,
                   help="within a layer calibrate o, gate/up and down on the outputs of the already quantized q/k/v, o, gate/up")
    p.add_argument("--dataset", default=BUILTIN_DATASET,
                   help=f"calibration text: '{BUILTIN_DATASET}' (built in, offline), a .txt or .jsonl ('text' field) file, "
                        f"or a Hugging Face dataset name (needs the network and `{HUB_DATASETS_INSTALL}`)")
    p.add_argument("--nsamples", type=positive_int, default=128, help="number of calibration windows")
    p.add_argument("--seqlen", type=positive_int, default=2048,
                   help="tokens per calibration window (clamped to the model's max positions)")
    p.add_argument("--seed", type=integer, default=0, help="seed for choosing calibration windows")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUTPUT_DIR")
    p.add_argument("--device", default="auto",
                   help="where each layer is quantized: auto (the first GPU where CUDA is present, else the CPU), "
                        "cpu, cuda or cuda:N")
    p.add_argument("--resume", action="store_true",
                   help="continue a run that was stopped (Ctrl-C, killed) from its last saved layer, with the same "
                        "result as an uninterrupted run; its progress is kept in .OUTPUT_DIR.progress beside OUTPUT_DIR")
    p.add_argument("--save-every", type=number, default=60.0, metavar="SECONDS",
                   help="save finished layers and their activations for --resume at most this often "
                        "(0: after every layer)")
    p.add_argument("--calibration-dtype", choices=("float32", "bfloat16", "auto"), default="float32",
                   help="dtype of the calibration forwards and Hessian products (the GPTQ solve is float32 "
                        "either way): bfloat16 is several times faster on CPUs with AMX/AVX-512 BF16 and on GPUs; "
                        "auto picks it where the device has it")
    p.add_argument("--activation-memory", type=non_negative_int, default=None, metavar="MIB",
                   help="MiB of calibration activations kept in memory; the rest go to files beside OUTPUT_DIR "
                        "while the run lasts, 0 for all of them (default: half the memory available at the start)")
    p.add_argument("--json-output", action="store_true", help="log as JSON lines")


def add_perplexity_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_id", metavar="MODEL_ID",
                   help="checkpoint directory (plain or GPTQ), hub id in the local HF cache, or 'default'")
    p.add_argument("--revision", default=None, help="hub revision of MODEL_ID")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model repository's own config code")
    p.add_argument("--dataset", default=BUILTIN_DATASET,
                   help=f"evaluation text: '{BUILTIN_DATASET}' (its held-out split, disjoint from calibration), "
                        f"a .txt or .jsonl file, or a Hugging Face dataset name (its test split; needs the network and "
                        f"`{HUB_DATASETS_INSTALL}`)")
    p.add_argument("--seqlen", type=positive_int, default=512, help="tokens per non-overlapping window")
    p.add_argument("--nsamples", type=positive_int, default=128, help="number of windows scored (from the start of the text)")
    p.add_argument("--batch-size", type=positive_int, default=None, help="windows per forward pass (default: ~2048 tokens)")
    p.add_argument("--json-output", action="store_true", help="log as JSON lines")


def register(subparsers) -> None:
    """Add the ``quantize`` and ``perplexity`` subcommands (with ``func`` defaults)."""
    fmt = _HelpFormatter
    q = subparsers.add_parser("quantize", help="GPTQ-quantize a model into an AutoGPTQ-layout checkpoint",
                              description="GPTQ-quantize MODEL_ID layer by layer and write an AutoGPTQ v1 checkpoint "
                                          "to OUTPUT_DIR.", formatter_class=fmt)
    add_quantize_arguments(q)
    q.set_defaults(func=run_quantize)
    p = subparsers.add_parser("perplexity", help="perplexity of a checkpoint on held-out text",
                              description="Perplexity of MODEL_ID over non-overlapping windows of held-out text; "
                                          "GPTQ checkpoints are dequantized to float32 first. Prints a JSON summary on stdout.",
                              formatter_class=fmt)
    add_perplexity_arguments(p)
    p.set_defaults(func=run_perplexity)


def _user_errors() -> tuple[type[BaseException], ...]:
    from text_generation_server.model_source import ModelNotFoundError
    from text_generation_server.quantize.checkpoint import (
        CheckpointReadError,
        UnsupportedArchitectureError,
    )
    from text_generation_server.quantize.data import DatasetError
    from text_generation_server.quantize.gptq import CholeskyError
    from text_generation_server.quantize.pipeline import AlreadyQuantizedError, UploadError
    from text_generation_server.quantize.runner import QuantizationConfigError
    from text_generation_server.quantize.writer import OutputDirError

    return (ModelNotFoundError, CheckpointReadError, UnsupportedArchitectureError, DatasetError, CholeskyError,
            AlreadyQuantizedError, UploadError, QuantizationConfigError, OutputDirError)


def run_quantize(args: argparse.Namespace) -> int:
    setup_logging("quantize", json_output=getattr(args, "json_output", False))
    from text_generation_server.quantize.gptq import QuantSpec
    from text_generation_server.quantize.pipeline import (
        CalibrationSettings,
        quantize_checkpoint,
        upload,
    )

    try:
        spec = QuantSpec(bits=args.bits, group_size=args.groupsize, sym=args.sym, act_order=args.act_order,
                         static_groups=args.static_groups, group_aware_order=args.group_aware_order,
                         percdamp=args.percdamp)
        calibration = CalibrationSettings(args.dataset, args.nsamples, args.seqlen, args.seed)
        out = quantize_checkpoint(
            args.model_id, args.output_dir, spec, calibration, revision=args.revision,
            trust_remote_code=args.trust_remote_code, true_sequential=args.true_sequential, overwrite=args.overwrite,
            resume=args.resume, save_every=args.save_every, device=args.device,
            activation_memory=None if args.activation_memory is None else args.activation_memory << 20,
            calibration_dtype=args.calibration_dtype,
        )
        if args.upload_to_model_id:
            upload(out, args.upload_to_model_id)
    except _user_errors() as err:
        logger.error(str(err))
        return 1
    except KeyboardInterrupt:
        from text_generation_server.quantize.progress import RunProgress

        kept = RunProgress.path_for(args.output_dir)
        also = f"; the layers finished so far are kept in {kept}: rerun with --resume to continue" if kept.exists() else ""
        logger.error(f"interrupted; nothing was written to {args.output_dir}{also}")
        return 130
    return 0


def run_perplexity(args: argparse.Namespace) -> int:
    setup_logging("perplexity", json_output=getattr(args, "json_output", False))
    from text_generation_server.quantize.data import eval_windows, load_text, tokenize
    from text_generation_server.quantize.perplexity import load_float_model, perplexity
    from text_generation_server.quantize.pipeline import load_tokenizer, resolve, set_threads

    try:
        path = resolve(args.model_id, args.revision)
        threads = set_threads()
        tokenizer = load_tokenizer(path, args.trust_remote_code)
        text = load_text(args.dataset, "eval")
        windows = eval_windows(tokenize(tokenizer, text), args.nsamples, args.seqlen)
        logger.info(f"Scoring {windows.shape[0]} windows of {args.seqlen} tokens of {text.source} with {path} ({threads} threads)")
        model = load_float_model(path, args.trust_remote_code)
        result = perplexity(model, windows, args.batch_size)
    except _user_errors() as err:
        logger.error(str(err))
        return 1
    logger.info(
        f"perplexity {result.perplexity:.4f} over {result.tokens} scored tokens "
        f"({result.windows} windows of {result.seqlen}) in {result.seconds:.1f} s"
    )
    print(json.dumps({"model": str(path), "dataset": text.source, **result.as_dict()}), flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="text-generation-server", description="GPTQ quantizer and perplexity tool")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{quantize,perplexity}")
    register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
