"""Regenerate the protobuf code from the checked-in .proto files with grpcio-tools.

`csi.proto` (the CSI spec's node part) gives csi_pb2.py, csi_pb2.pyi and csi_pb2_grpc.py;
`pluginregistration.proto` (kubelet's plugin registration API) gives pluginregistration_pb2*.
`python -m niphas_csi.proto.generate` rewrites the committed files; the test suite calls
`generate(tmp)` and compares, so the committed code can never drift from the .proto files.
"""

from __future__ import annotations

import sys
from importlib.resources import files
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTO_ROOT = HERE.parents[1]
"""The directory holding the `niphas_csi` package: imports in the output are package-absolute."""
PROTOS = ("csi", "pluginregistration")
OUTPUTS = tuple(
    f"{name}{suffix}" for name in PROTOS for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")
)
PYI_HEADER = b"# ruff: noqa\n# fmt: off\n"
"""ruff's exclude covers the generated *.py; the stubs get their own opt-out line."""


def generate(out_root: Path) -> dict[str, bytes]:
    """Run protoc into `out_root`; return the generated files' contents by name."""
    from grpc_tools import protoc

    include = str(files("grpc_tools") / "_proto")  # google/protobuf/wrappers.proto
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *(f"niphas_csi/proto/{name}.proto" for name in PROTOS),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    generated = out_root / "niphas_csi" / "proto"
    out = {name: (generated / name).read_bytes() for name in OUTPUTS}
    for name in OUTPUTS:
        if name.endswith(".pyi"):
            out[name] = PYI_HEADER + out[name]
    return out


def main() -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        for name, content in generate(Path(tmp)).items():
            (HERE / name).write_bytes(content)
            print(f"wrote {HERE / name}", file=sys.stderr)


if __name__ == "__main__":
    main()
