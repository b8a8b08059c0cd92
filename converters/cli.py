"""dynamo-export: a checkpoint directory -> an ONNX artifact directory (thin layer over export_artifact)."""

from __future__ import annotations

import argparse
import sys

from converters.artifact import DEFAULT_OPSET, EXTERNAL_DATA, ExportResult, export_artifact
from converters.heldout import DEFAULT_SEQ_LEN, DEFAULT_WINDOWS
from converters.optimize import INT4_UNEMBEDDINGS, Int4Config
from dynamo_export.errors import DynaMoError
from runtime.contract import INT4_BLOCK_SIZES, WEIGHT_DTYPES
from runtime.errors import DynaMoRuntimeError
from runtime.help_format import HelpFormatter


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dynamo-export",
        description="Export a DynaMo (or plain GPT-NeoX) checkpoint to one ONNX graph with a KV cache that "
        "returns every head's logits, plus a manifest the runtime reads.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "--model", required=True, help="checkpoint directory (DynaMo save_pretrained, or GPT-NeoX)"
    )
    parser.add_argument("--out", help="artifact directory (default: out/<model>-<dtype>-onnx)")
    parser.add_argument(
        "--cooccurrence", help="co-occurrence directory from dynamo-cooccur to ship with the model"
    )
    parser.add_argument(
        "--dtype",
        choices=WEIGHT_DTYPES,
        default="fp32",
        help="fp16 is for CUDA; int8 and int4 (4-bit weight blocks, ONNX Runtime's MatMulNBits) for CPU",
    )
    parser.add_argument(
        "--int4-block-size",
        type=int,
        choices=INT4_BLOCK_SIZES,
        help=f"--dtype int4: weights per scale (default {Int4Config.block_size}; 128 is ~20%% faster on CPU "
        "and a little less accurate)",
    )
    parser.add_argument(
        "--int4-symmetric",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="--dtype int4: no zero points (default: asymmetric, with a 4-bit zero point per block)",
    )
    parser.add_argument(
        "--int4-unembedding",
        choices=INT4_UNEMBEDDINGS,
        help="--dtype int4: the unembedding as int8 with one activation scale per row (default: verify's "
        "3-token passes cost 1.35x a 1-token pass at Pythia-70M's shape, not 1.7x) or as 4-bit blocks (smallest artifact)",
    )
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset of the graph (int4: 21)")
    parser.add_argument(
        "--external-data",
        choices=EXTERNAL_DATA,
        default="auto",
        help="auto: weights go to model.onnx.data above 2 GB; always: whatever the size",
    )
    parser.add_argument(
        "--optimize",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="apply onnxruntime's transformer fusions (off by default: no consistent gain measured on CPU)",
    )
    parser.add_argument(
        "--verify",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="compare ONNX Runtime with PyTorch after export and fail on disagreement",
    )
    parser.add_argument(
        "--eval-tokens",
        metavar="FILE",
        help="held-out token file (dynamo-data): report the graph's PPL_1..n next to the float32 model's",
    )
    parser.add_argument(
        "--eval-windows",
        type=int,
        metavar="N",
        help=f"--eval-tokens: windows of {DEFAULT_SEQ_LEN} tokens to score, spread over the file "
        f"(default {DEFAULT_WINDOWS})",
    )
    parser.add_argument("--force", action="store_true", help="replace an existing artifact directory")
    parser.add_argument(
        "--sign",
        metavar="PRIVATE_KEY",
        help="sign every file, manifest included, into model.sig with this elliptic-curve private key (PEM), "
        'offline; check with dynamo-generate --require-signature PUBKEY (needs pip install "dynamo-export[sign]") '
        "(default: unsigned)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    int4 = None
    if any(v is not None for v in (args.int4_block_size, args.int4_symmetric, args.int4_unembedding)):
        int4 = Int4Config(
            block_size=args.int4_block_size or Int4Config.block_size,
            symmetric=bool(args.int4_symmetric),
            unembedding=args.int4_unembedding or Int4Config.unembedding,
        )
    try:
        result = export_artifact(
            args.model,
            out=args.out,
            cooccurrence=args.cooccurrence,
            dtype=args.dtype,
            opset=args.opset,
            external_data=args.external_data,
            optimize=args.optimize,
            verify=args.verify,
            force=args.force,
            progress=sys.stderr.isatty(),
            int4=int4,
            eval_tokens=args.eval_tokens,
            eval_windows=args.eval_windows,
            sign=args.sign,
        )
    except (DynaMoError, DynaMoRuntimeError) as exc:
        print(f"dynamo-export: error: {exc}", file=sys.stderr)
        return 2
    print(summary(result))
    return 0


def summary(result: ExportResult) -> str:
    model = result.manifest.model
    lines = [
        f"wrote {result.out}: {model.num_token_heads} head(s), {model.num_cache_layers} cache layers "
        f"({model.num_cache_layers - model.num_token_heads} stem + head 1's + {model.num_token_heads - 1} extra "
        f"heads'), vocab {model.vocab_size}, {result.manifest.graph.dtype}, opset {result.manifest.graph.opset}"
    ]
    for path, entry in sorted(result.manifest.files.items()):
        lines.append(f"  {path:<32} {_size(entry.size):>10}")
    if "quantization" in result.manifest.producer:
        lines.append(f"  quantization: {result.manifest.producer['quantization']}")
    lines.append(f"  parity: {result.parity.summary() if result.parity else 'not verified (--no-verify)'}")
    if result.heldout is not None:
        lines.append(f"  held-out: {result.heldout.summary()}")
    if result.signature is not None:
        lines.append(f"  signed: {result.signature} covers every file above and manifest.json")
    if result.fused:
        lines.append(f"  fusions: {', '.join(f'{op}={n}' for op, n in sorted(result.fused.items()))}")
    steps = ", ".join(f"{name} {seconds:.1f}s" for name, seconds in result.seconds.items())
    lines.append(f"  time: {sum(result.seconds.values()):.1f}s ({steps})")
    return "\n".join(lines)


def _size(size: float) -> str:
    for unit in ("B", "KB", "MB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"


if __name__ == "__main__":
    sys.exit(main())
