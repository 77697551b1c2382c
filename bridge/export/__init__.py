"""Exports of a calibration: parameter files (`files`), msModelSlim's W8A8 layout
(`w8a8`), ONNX QDQ (`onnx`) and its Ascend form (`ascend`, on `graph`'s constant folding);
`calibrated` takes them from a `Calibrator`'s parameter record. Importing this package
does not import `onnx` (an optional extra)."""

from bridge.export.files import (
    FORMAT_VERSION,
    JSON_NAME,
    LEGACY_KEYS,
    MANIFEST_NAME,
    SAFETENSORS_NAME,
    ExportError,
    atomic_directory,
    integer_dtype,
    sha256,
    verify_manifest,
    write_params,
    write_w8a8,
)

__all__ = [
    "FORMAT_VERSION",
    "JSON_NAME",
    "LEGACY_KEYS",
    "MANIFEST_NAME",
    "SAFETENSORS_NAME",
    "ExportError",
    "atomic_directory",
    "integer_dtype",
    "sha256",
    "verify_manifest",
    "write_params",
    "write_w8a8",
]
