"""Signed artifacts: an OpenSSF model-signing signature over every file, checked before anything is used.

`dynamo-export --sign KEY` (`sign_artifact`) writes SIGNATURE_NAME (model.sig) into the
artifact after its manifest: a Sigstore bundle signed offline with an elliptic-curve private
key (PEM), no Sigstore service involved, whose in-toto payload lists the sha256 of every file,
manifest.json included (model-signing's per-file serialization). `DynaMoRuntime.load(...,
verify_signature=PUBKEY)` and `dynamo-generate --require-signature PUBKEY` refuse an artifact
unless that signature, by that key, covers exactly the files read.

Verification runs on the bytes the loader read once (runtime/artifact_files.py), not on the
files. model-signing's own `verifying.Config.verify` re-hashes the directory by path, which
would open every file a second time, between the check and the use. So the library is asked
only to check the signature (the bundle's ECDSA signature by the key, the payload's type and
the root digest over its resources) and to hand back the signed (file -> sha256) list; the
loader holds the bytes it read, the same ones it then hands on, against that list. This uses
the library's key-mode classes below its high-level API, hence the exact version pin.

model-signing is an optional extra (`pip install "dynamo-export[sign]"`): with sigstore,
cryptography, pyOpenSSL and pydantic it adds about 51 MB, much of it compiled, which an
embedded runtime that never checks signatures should not carry.
"""

from __future__ import annotations

import os
from pathlib import Path

from runtime.errors import SignatureError
from runtime.manifest import SIGNATURE_NAME

INSTALL = 'pip install "dynamo-export[sign]"'
_KEY_HINT = (
    "--sign takes an unencrypted elliptic-curve private key in PEM (P-256, P-384 or P-521: "
    "openssl ecparam -name prime256v1 -genkey -noout -out key.pem)"
)


def sign_artifact(artifact_dir: str | os.PathLike, private_key: str | os.PathLike) -> Path:
    """Sign every file of `artifact_dir` with the elliptic-curve PEM `private_key`; returns the signature's
    path. The exporter calls it on the finished artifact before the final rename (converters/artifact.py)."""
    hashing, signing = _library("hashing", "signing")
    _check_private_key(Path(private_key))
    root = Path(artifact_dir)
    target = root / SIGNATURE_NAME
    config = hashing.Config().use_file_serialization(hashing_algorithm="sha256", allow_symlinks=False)
    config.set_ignored_paths(paths=[SIGNATURE_NAME], ignore_git_paths=False)  # every other file counts
    try:
        signer = signing.Config().use_elliptic_key_signer(private_key=Path(private_key))
        signer.set_hashing_config(config).sign(root, target)
    except ValueError as exc:  # a curve Sigstore's bundles do not name
        raise SignatureError(f"cannot sign with {private_key}: {exc}. {_KEY_HINT}") from exc
    return target


def _check_private_key(path: Path) -> None:
    """An unencrypted elliptic-curve private key in PEM, or SignatureError naming what it is instead
    (model-signing itself fails on an RSA key with an AttributeError)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except OSError as exc:
        raise SignatureError(f"cannot read the private key {path}: {exc.strerror}") from exc
    except (ValueError, TypeError) as exc:  # not PEM, or encrypted
        raise SignatureError(f"{path} is not an unencrypted private key in PEM ({exc}). {_KEY_HINT}") from exc
    except Exception as exc:  # cryptography's UnsupportedAlgorithm
        raise SignatureError(f"{path} holds a key cryptography cannot use ({exc}). {_KEY_HINT}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise SignatureError(
            f"{path} is a {type(key).__name__}, not an elliptic-curve private key. {_KEY_HINT}"
        )


def signing_problems(private_key: str | os.PathLike) -> list[str]:
    """What stops `sign_artifact` with this key before any work starts: no library, no key file."""
    problems = []
    try:
        _library("signing")
    except SignatureError as exc:
        problems.append(f"--sign: {exc}")
    if not Path(private_key).is_file():
        problems.append(f"--sign {private_key} is not a file: pass an elliptic-curve private key in PEM")
    return problems


def signed_digests(signature: bytes, public_key: str | os.PathLike, root: Path) -> dict[str, str]:
    """The (file -> sha256 hex) list that `signature` (model.sig's bytes) signs, once the signature is
    verified against the elliptic-curve PEM `public_key`; SignatureError otherwise."""
    sign_ec_key, sign_sigstore_pb = _library("_signing.sign_ec_key", "_signing.sign_sigstore_pb")
    where = root / SIGNATURE_NAME
    try:
        verifier = sign_ec_key.Verifier(Path(public_key))
    except OSError as exc:
        raise SignatureError(f"cannot read the public key {public_key}: {exc.strerror}") from exc
    except Exception as exc:  # cryptography's errors for a key that is not an EC PEM public key
        raise SignatureError(
            f"{public_key} is not an elliptic-curve public key in PEM ({type(exc).__name__}: {exc})"
        ) from exc
    try:
        bundle = sign_sigstore_pb.Signature.read(_Text(signature.decode("utf-8")))
        signed = verifier.verify(bundle)
    except Exception as exc:  # JSON, bundle schema, ECDSA, payload: any failure means "invalid"
        raise SignatureError(
            f"{where} is not a valid signature of this artifact by {public_key} "
            f"({type(exc).__name__}: {str(exc)[:200]}): the artifact or its signature was altered, or it "
            "was signed with another key"
        ) from exc
    method = signed.serialization_type
    if method.get("method") != "files" or method.get("hash_type") != "sha256":
        raise SignatureError(
            f"{where} signs the files as {method.get('method')!r}/{method.get('hash_type')!r}; dynamo-export "
            "signs each file's sha256 ('files'/'sha256'): re-sign it with dynamo-export --sign"
        )
    return {item.identifier: item.digest.digest_hex for item in signed.resource_descriptors()}


class _Text:
    """The signature's text where model-signing's reader expects a path: it calls only read_text, so the
    bundle parsed is exactly the bytes the loader read, not the file as it is now."""

    def __init__(self, text: str):
        self._text = text

    def read_text(self, encoding: str = "utf-8") -> str:
        return self._text


def _library(*modules: str) -> list:
    """model-signing's modules, or SignatureError naming the extra that installs it."""
    import importlib

    try:
        return [importlib.import_module(f"model_signing.{name}") for name in modules]
    except ImportError as exc:
        raise SignatureError(
            f"signed artifacts need the model-signing package ({exc.name} is missing): {INSTALL}"
        ) from exc
