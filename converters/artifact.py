"""`export_artifact`: checkpoint directory -> self-describing ONNX artifact directory, atomically.

    DIR/manifest.json          everything the runtime needs to know (runtime/manifest.py)
    DIR/model.onnx             the graph (converters/io_spec.py has its I/O contract)
    DIR/model.onnx.data        its weights, when they pass 2 GB or --external-data always
    DIR/tokenizer.json         when the checkpoint has one
    DIR/cooccurrence/          when given, validated against the model's vocabulary

Everything is built in a staging directory next to DIR and renamed into place
at the end (runtime/atomic.py), so DIR either holds a complete, verified artifact
or is untouched: a failed export leaves nothing behind, and an existing DIR is
replaced only with force=True (and only if it is an artifact or empty).
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import onnx
from tqdm.auto import tqdm
from transformers import GPTNeoXConfig

from converters.errors import ExportError
from converters.heldout import (
    DEFAULT_SEQ_LEN,
    DEFAULT_WINDOWS,
    HeldoutReport,
    check_eval_tokens,
    heldout_perplexity,
)
from converters.io_spec import IOSpec, check_graph_io, io_spec
from converters.onnx_export import check_shared_projection, export_onnx
from converters.optimize import Int4Config, fuse, quantize_int4, quantize_int8, save_onnx, to_fp16
from converters.verify import ParityReport, provider_for, verify_graph
from dynamo_export.checkpoint import checkpoint_fingerprint, checkpoint_kind
from dynamo_export.config import DynaMoConfig
from dynamo_export.errors import CheckpointError
from dynamo_export.modeling import DynaMoForCausalLM
from dynamo_export.tokens import read_token_meta
from runtime.atomic import install_directory
from runtime.config import SamplingConfig
from runtime.contract import CACHE_DTYPE, WEIGHT_DTYPES
from runtime.cooccurrence_file import MATRIX_NAMES, META_NAME, load_cooccurrence
from runtime.errors import CooccurrenceFileError
from runtime.fingerprint import check_same_tokenizer
from runtime.manifest import (
    FORMAT_NAME,
    MANIFEST_NAME,
    SCHEMA_VERSION,
    GraphInfo,
    Manifest,
    ModelInfo,
    inventory,
    read_manifest,
    verify_files,
)
from runtime.signing import sign_artifact, signing_problems

EXTERNAL_DATA = ("auto", "always")
# The dynamo exporter emits opset 18; older opsets would need a lossy down-conversion.
MIN_OPSET = 18
DEFAULT_OPSET = 18
# Protobuf cannot serialise a message over 2 GiB; weights beyond 2 GB go to model.onnx.data.
EXTERNAL_DATA_THRESHOLD = 2_000_000_000
MODEL_FILE = "model.onnx"
DATA_FILE = MODEL_FILE + ".data"
TOKENIZER_FILE = "tokenizer.json"
COOCCURRENCE_DIR = "cooccurrence"


@dataclass
class ExportResult:
    out: Path
    manifest: Manifest | None  # None until the artifact is installed
    parity: ParityReport | None
    seconds: dict[str, float] = field(default_factory=dict)  # per step
    fused: dict[str, int] = field(default_factory=dict)
    heldout: HeldoutReport | None = None  # with eval_tokens
    signature: Path | None = None  # with sign: the artifact's model.sig (runtime/signing.py)


@dataclass(frozen=True)
class _Plan:
    model_path: Path
    kind: str  # 'dynamo' | 'gpt_neox'
    config: DynaMoConfig | GPTNeoXConfig
    out: Path
    cooccurrence: Path | None
    dtype: str
    int4: Int4Config | None  # with dtype int4
    opset: int
    external_data: str
    optimize: bool
    verify: bool
    force: bool
    eval_tokens: Path | None
    eval_windows: int
    eval_seq_len: int
    tokenizer_fingerprint: str | None = None  # the checkpoint's (runtime/fingerprint.py); None: unknown
    sign: Path | None = None  # the private key that signs the artifact (runtime/signing.py)


def default_out(model_path: str | os.PathLike, dtype: str) -> Path:
    """out/<model>-<dtype>-onnx: outside artifacts/, which holds the checkpoints this repo ships."""
    return Path("out") / f"{Path(model_path).resolve().name}-{dtype}-onnx"


def export_artifact(
    model_path: str | os.PathLike,
    out: str | os.PathLike | None = None,
    cooccurrence: str | os.PathLike | None = None,
    dtype: str = "fp32",
    opset: int = DEFAULT_OPSET,
    external_data: str = "auto",
    optimize: bool = False,
    verify: bool = True,
    force: bool = False,
    progress: bool = True,
    int4: Int4Config | None = None,
    eval_tokens: str | os.PathLike | None = None,
    eval_windows: int | None = None,
    sign: str | os.PathLike | None = None,
) -> ExportResult:
    """Export a DynaMo (or plain GPT-NeoX, as one head) checkpoint to an artifact directory.

    `int4` sets dtype int4's block size, symmetry and unembedding form (default Int4Config()).
    `eval_tokens`, a held-out token file, adds the graph's PPL_1..n next to the
    float32 model's on `eval_windows` windows (default 16) to the report and the
    manifest (converters/heldout.py). `sign`, an elliptic-curve private key (PEM),
    signs every file, the manifest included, into model.sig before the artifact is
    installed (runtime/signing.py; offline, no Sigstore service).

    All options are checked before any work starts. Raises CheckpointError for a
    bad checkpoint, ExportError for bad options, an unwritable or occupied `out`,
    a co-occurrence directory or token file that does not fit, or a graph that
    breaks the I/O contract, and ParityError when verification fails.
    """
    plan = _plan(
        model_path, out, cooccurrence, dtype, opset, external_data, optimize, verify, force,
        int4, eval_tokens, eval_windows, sign,
    )  # fmt: skip
    steps = ["load", "export", *(["fuse"] if optimize else []), *([dtype] if dtype != "fp32" else [])]
    steps += ["save", *(["verify"] if verify else []), *(["heldout"] if eval_tokens else [])]
    steps += ["manifest", *(["sign"] if sign is not None else []), "install"]
    created = _missing_ancestors(plan.out.parent)
    try:
        plan.out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=plan.out.parent, prefix=f".{plan.out.name}.tmp-"))
    except OSError as exc:
        _remove_empty(created)
        raise ExportError(
            f"cannot write the artifact to {plan.out.parent}: {exc}; choose a writable --out"
        ) from exc

    bar = tqdm(total=len(steps), desc="dynamo-export", unit="step", disable=not progress)
    result = ExportResult(out=plan.out, manifest=None, parity=None)
    try:
        _build(plan, staging, functools.partial(_step, bar, result.seconds), result)
    except ExportError as exc:  # name the artifact the user asked for, not our staging folder
        message = (
            str(exc).replace(str(staging / "artifact"), str(plan.out)).replace(str(staging), str(plan.out))
        )
        if message == str(exc):
            raise
        raise type(exc)(message) from exc
    finally:
        bar.close()
        shutil.rmtree(staging, ignore_errors=True)
        if result.manifest is None:  # failed before or in the final rename
            _remove_empty(created)
    return result


def _build(plan: _Plan, staging: Path, step, result: ExportResult) -> None:
    """The export proper: every step writes under `staging` until the final rename to plan.out."""
    built, work = staging / "artifact", staging / "work"
    built.mkdir(mode=0o755)
    work.mkdir()
    with step("load"):
        if plan.cooccurrence is not None:
            _copy_cooccurrence(plan, built / COOCCURRENCE_DIR)
        model = _load_model(plan)
    config = model.config
    with step("export"):
        current = export_onnx(model, work / "export" / MODEL_FILE, io_spec(config), plan.opset)
        check_shared_projection(current, model.embed_out.weight.detach().numpy())
    if plan.optimize:
        with step("fuse"):
            heads, hidden = config.num_attention_heads, config.hidden_size
            result.fused = fuse(current, work / "fused" / MODEL_FILE, heads, hidden)
            current = work / "fused" / MODEL_FILE
    if plan.dtype != "fp32":
        with step(plan.dtype):
            target = work / plan.dtype / MODEL_FILE
            if plan.dtype == "int4":
                quantize_int4(current, target, plan.int4)
            else:
                (to_fp16 if plan.dtype == "fp16" else quantize_int8)(current, target)
            current = target
    spec = io_spec(config, cache_dtype=CACHE_DTYPE[plan.dtype])  # the logits stay float32 at every dtype
    with step("save"):
        external = _save_final(current, built / MODEL_FILE, plan.external_data)
        check_graph_io(onnx.load(str(built / MODEL_FILE), load_external_data=False), spec)
    if plan.verify:
        with step("verify"):
            result.parity = verify_graph(model, built / MODEL_FILE, spec, plan.dtype)
    if plan.eval_tokens is not None:
        with step("heldout"):
            result.heldout = heldout_perplexity(
                model, built / MODEL_FILE, spec, plan.eval_tokens, plan.eval_windows, plan.eval_seq_len,
                provider_for(plan.dtype),
            )  # fmt: skip
    with step("manifest"):
        if (plan.model_path / TOKENIZER_FILE).is_file():
            shutil.copyfile(plan.model_path / TOKENIZER_FILE, built / TOKENIZER_FILE)
        fusions = result.fused if plan.optimize else None
        manifest = _write_manifest(built, plan, config, spec, external, result, fusions)
    if plan.sign is not None:
        with step("sign"):
            result.signature = plan.out / sign_artifact(built, plan.sign).name
    with step("install"):
        _make_shareable(built)
        install_directory(built, plan.out, overwrite=plan.force)
    result.manifest = manifest


# -- planning: every check that can run before the work starts ---------------------------------------


def _plan(
    model_path, out, cooccurrence, dtype, opset, external_data, optimize, verify, force,
    int4, eval_tokens, eval_windows, sign=None,
) -> _Plan:  # fmt: skip
    problems = []
    if dtype not in WEIGHT_DTYPES:
        problems.append(f"--dtype {dtype!r} is not one of {list(WEIGHT_DTYPES)}")
    max_opset = onnx.defs.onnx_opset_version()
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= max_opset:
        problems.append(f"--opset {opset!r} must be an integer in {MIN_OPSET}..{max_opset}")
    if external_data not in EXTERNAL_DATA:
        problems.append(f"--external-data {external_data!r} is not one of {list(EXTERNAL_DATA)}")
    if int4 is not None and dtype != "int4":
        problems.append(
            f"--int4-block-size/--int4-symmetric/--int4-unembedding apply to --dtype int4 only, not {dtype!r}: "
            "drop them or pass --dtype int4"
        )
    elif int4 is not None and not isinstance(int4, Int4Config):
        problems.append(f"int4 must be an Int4Config, got {type(int4).__name__}")
    elif int4 is not None:
        problems += int4.problems()
    if eval_windows is not None and eval_tokens is None:
        problems.append("--eval-windows needs --eval-tokens: pass a held-out token file or drop it")
    elif eval_windows is not None and (isinstance(eval_windows, bool) or not isinstance(eval_windows, int)
                                       or eval_windows < 1):  # fmt: skip
        problems.append(f"--eval-windows {eval_windows!r} must be an integer >= 1")
    if sign is not None:
        problems += signing_problems(sign)
    if problems:
        raise ExportError("invalid export options: " + "; ".join(problems))

    model_path = Path(model_path)
    kind = checkpoint_kind(model_path)  # CheckpointError for a missing path or a foreign model type
    config_cls = DynaMoConfig if kind == "dynamo" else GPTNeoXConfig
    try:
        config = config_cls.from_pretrained(model_path)
    except (ValueError, TypeError, OSError) as exc:
        raise CheckpointError(f"{model_path}/config.json is not a valid {kind} config: {exc}") from exc
    out = Path(out) if out is not None else default_out(model_path, dtype)
    _check_out(out, force)
    if cooccurrence is not None and not Path(cooccurrence).is_dir():
        raise ExportError(
            f"--cooccurrence {cooccurrence} is not a directory: pass a dynamo-cooccur output directory"
        )
    heads = getattr(config, "num_token_heads", 1)  # a GPT-NeoX checkpoint exports as one head
    eval_seq_len = min(DEFAULT_SEQ_LEN, config.max_position_embeddings)
    fingerprint = checkpoint_fingerprint(model_path)
    if eval_tokens is not None:
        check_eval_tokens(eval_tokens, config.vocab_size, heads, eval_seq_len)
        fix = f"tokenize the held-out text with {model_path / TOKENIZER_FILE} (dynamo-data tokenize)"
        eval_fingerprint = read_token_meta(eval_tokens).tokenizer_fingerprint
        check_same_tokenizer(
            fingerprint, f"model {model_path}", eval_fingerprint, f"--eval-tokens {eval_tokens}", fix
        )
    return _Plan(
        model_path=model_path,
        kind=kind,
        config=config,
        out=out,
        cooccurrence=Path(cooccurrence) if cooccurrence is not None else None,
        dtype=dtype,
        int4=(int4 or Int4Config()) if dtype == "int4" else None,
        opset=opset,
        external_data=external_data,
        optimize=optimize,
        verify=verify,
        force=force,
        eval_tokens=Path(eval_tokens) if eval_tokens is not None else None,
        eval_windows=eval_windows or DEFAULT_WINDOWS,
        eval_seq_len=eval_seq_len,
        tokenizer_fingerprint=fingerprint,
        sign=Path(sign) if sign is not None else None,
    )


def _check_out(out: Path, force: bool) -> None:
    if out.exists() or out.is_symlink():
        if not force:
            raise ExportError(f"{out} already exists: pass --force to replace it, or choose another --out")
        if out.is_symlink() or not out.is_dir():
            raise ExportError(
                f"{out} exists and is not a directory; refusing to replace it even with --force"
            )
        if any(out.iterdir()) and not (out / MANIFEST_NAME).is_file():
            raise ExportError(
                f"{out} is a non-empty directory without {MANIFEST_NAME}; --force only replaces an earlier "
                "artifact, choose another --out"
            )
    ancestor = out.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ExportError(f"cannot write {out}: {ancestor} is not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ExportError(f"cannot write {out}: {ancestor} is not writable; choose a writable --out")


def _missing_ancestors(path: Path) -> list[Path]:
    """Directories that creating `path` would create, deepest first (to remove them again on failure)."""
    missing = []
    while not path.exists():
        missing.append(path)
        path = path.parent
    return missing


def _remove_empty(directories: list[Path]) -> None:
    for directory in directories:
        try:
            directory.rmdir()
        except OSError:
            return  # not empty (someone else wrote there) or already gone: leave it and its parents


# -- the steps ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def _step(bar, seconds: dict[str, float], name: str):
    """Time one step into `seconds` and advance the progress bar."""
    bar.set_postfix_str(name)
    start = time.perf_counter()
    yield
    seconds[name] = time.perf_counter() - start
    bar.update(1)


def _load_model(plan: _Plan) -> DynaMoForCausalLM:
    if plan.kind == "dynamo":
        return DynaMoForCausalLM.from_pretrained(plan.model_path)
    # A plain GPT-NeoX model is a DynaMo model with one head: the same graph and runtime serve it.
    return DynaMoForCausalLM.from_gpt_neox(plan.model_path, num_token_heads=1).eval()


def _copy_cooccurrence(plan: _Plan, target: Path) -> None:
    """Copy the format's files (and nothing else), then validate the copy that will ship.

    Masks counted from another tokenizer's ids pass the vocabulary-size check when the sizes
    agree, so their recorded tokenizer fingerprint must match the model's as well."""
    source, vocab_size = plan.cooccurrence, plan.config.vocab_size
    target.mkdir(mode=0o755)
    try:
        meta_file = source / META_NAME
        if not meta_file.is_file():
            raise CooccurrenceFileError(f"{meta_file} not found: {source} is not a co-occurrence directory")
        shutil.copyfile(meta_file, target / META_NAME)
        for name in MATRIX_NAMES.values():
            if (source / name).is_file():
                shutil.copyfile(source / name, target / name)
        meta, _ = load_cooccurrence(target, expected_vocab_size=vocab_size)
        check_same_tokenizer(
            plan.tokenizer_fingerprint,
            f"model {plan.model_path}",
            meta.tokenizer_fingerprint,
            f"--cooccurrence {source}",
            "count the masks with dynamo-cooccur from token files made with the model's own tokenizer "
            f"({plan.model_path / TOKENIZER_FILE})",
        )
    except CooccurrenceFileError as exc:
        raise ExportError(f"--cooccurrence {source} cannot ship with this model: {exc}") from exc


def _save_final(current: Path, target: Path, external_data: str) -> bool:
    """Write the final graph into the artifact; returns whether its weights went to model.onnx.data."""
    model = onnx.load(str(current))
    weights = sum(tensor.ByteSize() for tensor in model.graph.initializer)
    external = external_data == "always" or weights > EXTERNAL_DATA_THRESHOLD
    save_onnx(model, target, external=external)
    return external


def _write_manifest(
    built: Path,
    plan: _Plan,
    config: DynaMoConfig,
    spec: IOSpec,
    external: bool,
    result: ExportResult,
    fused: dict[str, int] | None,
) -> Manifest:
    heads = config.num_token_heads
    sampling = SamplingConfig() if heads > 1 else SamplingConfig(mode="ar")
    manifest = Manifest(
        format=FORMAT_NAME,
        schema_version=SCHEMA_VERSION,
        model=ModelInfo(
            architecture=plan.kind if plan.kind == "gpt_neox" else config.model_type,
            num_token_heads=heads,
            num_hidden_layers=config.num_hidden_layers,
            num_cache_layers=config.num_cache_layers,
            num_attention_heads=config.num_attention_heads,
            head_dim=config.head_dim,
            hidden_size=config.hidden_size,
            vocab_size=config.vocab_size,
            context_length=config.max_position_embeddings,
            eos_token_id=config.eos_token_id,
            pad_token_id=config.pad_token_id,
            bos_token_id=config.bos_token_id,
        ),
        graph=GraphInfo(
            file=MODEL_FILE,
            external_data=DATA_FILE if external else None,
            dtype=plan.dtype,
            cache_dtype=spec.cache_dtype,
            logits_dtype=spec.logits_dtype,
            opset=_default_opset(built / MODEL_FILE),  # int4 raises --opset to 21 (converters/optimize.py)
            inputs=spec.inputs,
            outputs=spec.outputs,
        ),
        tokenizer=TOKENIZER_FILE if (built / TOKENIZER_FILE).is_file() else None,
        cooccurrence=COOCCURRENCE_DIR if (built / COOCCURRENCE_DIR).is_dir() else None,
        sampling_defaults=sampling.to_dict(),
        producer=_producer(fused, plan.int4),
        verification=_verification(result),
        files=inventory(built),
        tokenizer_fingerprint=plan.tokenizer_fingerprint,
    )
    (built / MANIFEST_NAME).write_text(manifest.to_json(), encoding="utf-8")
    # Read it back the way the runtime will: the strict schema and every file's size and hash.
    written = read_manifest(built)
    verify_files(built, written)
    return written


def _default_opset(graph: Path) -> int:
    opsets = {o.domain: o.version for o in onnx.load(str(graph), load_external_data=False).opset_import}
    return opsets.get("", opsets.get("ai.onnx", 0))


def _verification(result: ExportResult) -> dict:
    figures = result.parity.to_dict() if result.parity else {"status": "skipped (--no-verify)"}
    if result.heldout is not None:
        figures["heldout"] = result.heldout.to_dict()
    return figures


def _producer(fused: dict[str, int] | None, int4: Int4Config | None) -> dict[str, str]:
    versions = {
        name: metadata.version(name)
        for name in ("torch", "transformers", "onnx", "onnxruntime", "onnxscript")
    }
    fusions = (
        "off" if fused is None else ", ".join(f"{op}={n}" for op, n in sorted(fused.items())) or "none found"
    )
    producer = {**versions, "exporter": "torch.onnx.export(dynamo=True)", "ort_transformer_fusions": fusions}
    if int4 is not None:
        producer["quantization"] = int4.describe()
    return producer


def _make_shareable(root: Path) -> None:
    """World-readable like any installed file: temp files (onnx's data file, mkstemp) start as 0600."""
    for path in [root, *root.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
