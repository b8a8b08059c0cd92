"""Signed artifacts (runtime/signing.py): a model-signing signature over every file, manifest included.

Each tampering below is made as an attacker who ships a whole artifact would make it: where a
file changes, the manifest is rewritten with fresh sizes and hashes too, so only the signature
stands between the change and the runtime. Key pairs are made here with `cryptography`; nothing
touches the network (key mode, no Sigstore service).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

import runtime.signing
from converters import artifact
from converters.artifact import export_artifact
from converters.cli import main as export_main
from runtime import DynaMoRuntime
from runtime.cli import main as generate_main
from runtime.errors import ArtifactFileError, SignatureError
from runtime.manifest import MANIFEST_NAME, SIGNATURE_NAME, inventory, read_manifest
from runtime.signing import sign_artifact


def _write_key(directory: Path, name: str, key) -> tuple[Path, Path]:
    private = directory / f"{name}.pem"
    public = directory / f"{name}.pub"
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return private, public


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """(private, public) PEM paths: 'signer' and 'stranger' (P-256), and an RSA pair (not supported)."""
    directory = tmp_path_factory.mktemp("keys")
    return {
        "signer": _write_key(directory, "signer", ec.generate_private_key(ec.SECP256R1())),
        "stranger": _write_key(directory, "stranger", ec.generate_private_key(ec.SECP384R1())),
        "rsa": _write_key(directory, "rsa", rsa.generate_private_key(public_exponent=65537, key_size=2048)),
    }


@pytest.fixture
def signed(tiny_artifact, keys, tmp_path) -> Path:
    """A private copy of the session's tiny artifact, signed by 'signer'."""
    root = tmp_path / "signed"
    shutil.copytree(tiny_artifact.out, root)
    sign_artifact(root, keys["signer"][0])
    return root


def _rehash(root: Path) -> None:
    manifest = read_manifest(root)
    (root / MANIFEST_NAME).write_text(dataclasses.replace(manifest, files=inventory(root)).to_json())


def _flip(path: Path, index: int) -> None:
    data = bytearray(path.read_bytes())
    data[index % len(data)] ^= 0x20
    path.write_bytes(bytes(data))


def test_a_signed_artifact_loads_and_generates(signed, keys):
    rt = DynaMoRuntime.load(signed, verify_signature=keys["signer"][1])
    assert rt.generate([1, 2, 3], max_new_tokens=4, seed=0).token_ids
    assert (signed / SIGNATURE_NAME).is_file()
    DynaMoRuntime.load(signed)  # the signature is an allowed extra file when nobody asks for it


def test_the_signature_lists_every_file_and_the_manifest(signed, keys):
    from runtime.signing import signed_digests

    digests = signed_digests((signed / SIGNATURE_NAME).read_bytes(), keys["signer"][1], signed)
    assert set(digests) == {MANIFEST_NAME, *read_manifest(signed).files}


def _edit_manifest_only(root: Path) -> None:
    raw = json.loads((root / MANIFEST_NAME).read_text())
    raw["producer"]["note"] = "repackaged"  # still a valid, self-consistent manifest
    (root / MANIFEST_NAME).write_text(json.dumps(raw))


def _edit_graph(root: Path) -> None:
    import onnx

    model = onnx.load(str(root / "model.onnx"), load_external_data=False)
    onnx.helper.set_model_props(model, {"tampered": "yes"})
    (root / "model.onnx").write_bytes(model.SerializeToString())
    _rehash(root)


def _edit_mask(root: Path) -> None:
    meta = root / "cooccurrence" / "cooccurrence.json"
    raw = json.loads(meta.read_text())
    raw["min_count"] += 1
    meta.write_text(json.dumps(raw))
    _rehash(root)


def _edit_tokenizer(root: Path) -> None:
    path = root / "tokenizer.json"
    raw = json.loads(path.read_text())
    raw["normalizer"] = {"type": "Lowercase"}  # allowed by the tokenizer policy: only the signature objects
    path.write_text(json.dumps(raw))
    _rehash(root)


def _edit_data_without_rehash(root: Path) -> None:
    _flip(root / "model.onnx.data", 1234)  # same size; the signature is checked before the hash


@pytest.mark.parametrize(
    "tamper, file",
    [
        (_edit_manifest_only, MANIFEST_NAME),
        (_edit_graph, MANIFEST_NAME),  # the rehashed manifest is what no longer matches
        (_edit_mask, MANIFEST_NAME),
        (_edit_tokenizer, MANIFEST_NAME),
        (_edit_data_without_rehash, "model.onnx.data"),
    ],
    ids=["manifest", "graph", "mask", "tokenizer", "weights"],
)
def test_a_tampered_file_fails_the_signature(signed, keys, tamper, file):
    tamper(signed)
    DynaMoRuntime.load(signed, check_hashes=file == MANIFEST_NAME)  # it is a valid artifact otherwise...
    with pytest.raises(SignatureError, match=rf"{file} does not match the artifact's signature"):
        DynaMoRuntime.load(signed, verify_signature=keys["signer"][1])  # ...but not the one signed


def test_a_file_changed_after_signing_is_refused_even_without_hash_checks(signed, keys):
    _flip(signed / "tokenizer.json", 10)
    with pytest.raises(SignatureError, match=r"tokenizer\.json does not match"):
        DynaMoRuntime.load(signed, verify_signature=keys["signer"][1], check_hashes=False)


def test_a_file_added_and_listed_after_signing_is_refused(signed, keys):
    (signed / "extra.bin").write_bytes(b"not signed")
    _rehash(signed)
    with pytest.raises(SignatureError, match=MANIFEST_NAME):
        DynaMoRuntime.load(signed, verify_signature=keys["signer"][1])


def _resign_value(signature: bytes) -> bytes:
    """The bundle with one bit of its ECDSA signature flipped (still base64, still a bundle)."""
    import base64

    bundle = json.loads(signature)
    value = bytearray(base64.b64decode(bundle["dsseEnvelope"]["signatures"][0]["sig"]))
    value[-1] ^= 0x01
    bundle["dsseEnvelope"]["signatures"][0]["sig"] = base64.b64encode(bytes(value)).decode()
    return json.dumps(bundle).encode()


@pytest.mark.parametrize(
    "damage",
    [
        lambda sig: _resign_value(sig),  # another ECDSA signature value
        lambda sig: sig[: len(sig) // 2],  # truncated
        lambda sig: b"\xff\xfe not json",
        lambda sig: json.dumps({"mediaType": "x", "verificationMaterial": {}}).encode(),
    ],
    ids=["signature-value", "truncated", "not-text", "wrong-schema"],
)
def test_a_damaged_signature_is_refused(signed, keys, damage):
    path = signed / SIGNATURE_NAME
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(SignatureError, match="is not a valid signature"):
        DynaMoRuntime.load(signed, verify_signature=keys["signer"][1])


def test_a_payload_changed_inside_the_signature_is_refused(signed, keys):
    """The payload (base64 of the signed file list) edited, its ECDSA signature left as it was."""
    import base64

    path = signed / SIGNATURE_NAME
    bundle = json.loads(path.read_text())
    payload = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
    payload["predicate"]["resources"] = payload["predicate"]["resources"][1:]
    bundle["dsseEnvelope"]["payload"] = base64.b64encode(json.dumps(payload).encode()).decode()
    path.write_text(json.dumps(bundle))
    with pytest.raises(SignatureError, match="is not a valid signature"):
        DynaMoRuntime.load(signed, verify_signature=keys["signer"][1])


def test_another_key_and_no_signature_are_refused(signed, keys, tiny_artifact):
    with pytest.raises(SignatureError, match="is not a valid signature"):
        DynaMoRuntime.load(signed, verify_signature=keys["stranger"][1])
    with pytest.raises(SignatureError, match="not signed"):
        DynaMoRuntime.load(tiny_artifact.out, verify_signature=keys["signer"][1])
    with pytest.raises(SignatureError, match="not an elliptic-curve public key"):
        DynaMoRuntime.load(signed, verify_signature=keys["rsa"][1])
    with pytest.raises(SignatureError, match="cannot read the public key"):
        DynaMoRuntime.load(signed, verify_signature=signed / "no-such.pub")


def test_the_signature_is_checked_on_the_bytes_that_are_used(signed, keys, tmp_path, monkeypatch):
    """The directory is swapped for an unsigned one right after the signature is verified: the load
    must still hand on the verified bytes (it reads once), not the files now at the path."""
    other = tmp_path / "other"
    shutil.copytree(signed, other)
    _edit_graph(other)
    real = runtime.signing.signed_digests

    def verify_then_swap(*args, **kwargs):
        digests = real(*args, **kwargs)
        parking = tmp_path / "parking"
        signed.rename(parking)
        other.rename(signed)
        return digests

    monkeypatch.setattr(runtime.signing, "signed_digests", verify_then_swap)
    rt = DynaMoRuntime.load(signed, verify_signature=keys["signer"][1])
    assert "tampered" not in rt.session.session.get_modelmeta().custom_metadata_map


def test_signing_with_an_unsupported_key_is_a_typed_error(tiny_artifact, keys, tmp_path):
    root = tmp_path / "art"
    shutil.copytree(tiny_artifact.out, root)
    with pytest.raises(SignatureError, match="elliptic-curve private key"):
        sign_artifact(root, keys["rsa"][0])


def test_dynamo_export_sign_and_dynamo_generate_require_signature(
    tiny_dynamo_dir, keys, tmp_path, reuse_tiny_export, capsys
):
    out = tmp_path / "art"
    code = export_main(
        ["--model", str(tiny_dynamo_dir), "--out", str(out), "--no-verify", "--sign", str(keys["signer"][0])]
    )
    assert code == 0
    assert "signed:" in capsys.readouterr().out
    args = ["--artifact", str(out), "--prompt", "def", "--max-new-tokens", "3", "--seed", "0"]
    assert generate_main([*args, "--require-signature", str(keys["signer"][1])]) == 0
    capsys.readouterr()
    assert generate_main([*args, "--require-signature", str(keys["stranger"][1])]) == 2
    assert "is not a valid signature" in capsys.readouterr().err


def test_dynamo_export_refuses_a_missing_key_before_any_work(tiny_dynamo_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(artifact, "export_onnx", lambda *a, **k: pytest.fail("the export started"))
    with pytest.raises(artifact.ExportError, match=r"--sign .* is not a file"):
        export_artifact(tiny_dynamo_dir, out=tmp_path / "art", sign=tmp_path / "missing.pem", progress=False)


def test_without_the_library_the_error_names_the_extra(signed, keys, monkeypatch):
    import sys

    for name in [m for m in sys.modules if m.split(".")[0] == "model_signing"] + ["model_signing"]:
        monkeypatch.setitem(sys.modules, name, None)  # import fails as if it were not installed
    with pytest.raises(SignatureError, match=r'pip install "dynamo-export\[sign\]"'):
        DynaMoRuntime.load(signed, verify_signature=keys["signer"][1])


def test_an_unsigned_artifact_still_has_its_hashes_checked(signed):
    (signed / SIGNATURE_NAME).unlink()
    _flip(signed / "tokenizer.json", 3)
    with pytest.raises(ArtifactFileError, match="sha256"):
        DynaMoRuntime.load(signed)
