"""NAR benchmark: our serialiser vs `nix-store --dump`, our streaming NAR verification vs raw
hashlib.sha256, on the same generated tree in the same run.

    .venv/bin/python bench/bench_nar.py [--size-mb 200] [--repeat 9]

The tree (in a temp dir, added to the store with `nix-store --add` and deleted afterwards)
mixes large files with many small ones in nested directories. Timings are the medians of
`--repeat` interleaved runs with a warm page cache. Targets: serialiser >= 0.5x nix-store --dump,
verification >= 0.8x raw sha256.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
from pathlib import Path

from niphas_common.nix.hashes import NarVerifier
from niphas_common.nix.nar import iter_nar, nar_hash, write_nar
from niphas_common.nix.runner import NixRunner
from niphas_common.nix.store_path import StorePath

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for bench.report
from bench.bench_mesh import median_times
from bench.report import Report, add_json_option

SMALL_SHARE = 0.2
"""Fraction of the bytes in small files (4 KiB-64 KiB): the per-file overhead matters too."""


def generate_tree(root: Path, size: int) -> None:
    big_total = int(size * (1 - SMALL_SHARE))
    n_big = 16
    (root / "big").mkdir(parents=True)
    for i in range(n_big):
        (root / "big" / f"blob-{i:02}").write_bytes(os.urandom(big_total // n_big))
    remaining = size - big_total
    i = 0
    while remaining > 0:
        d = root / "small" / f"d{i % 37:02}" / f"e{i % 5}"
        d.mkdir(parents=True, exist_ok=True)
        n = min(remaining, 4096 + (i * 7919) % (60 << 10))
        f = d / f"f{i:05}"
        f.write_bytes(os.urandom(n))
        if i % 9 == 0:
            f.chmod(0o755)
        remaining -= n
        i += 1
    (root / "link").symlink_to("big/blob-00")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--size-mb", type=int, default=200, help="tree size in MiB (default 200)")
    ap.add_argument("--repeat", type=int, default=9, help="runs per measurement (default 9)")
    add_json_option(ap)
    args = ap.parse_args()
    runner = NixRunner()
    size = args.size_mb << 20

    with tempfile.TemporaryDirectory(prefix="niphas-bench-") as tmp:
        tree = Path(tmp, "niphas-bench-tree")
        print(f"generating a {args.size_mb} MiB tree ...", flush=True)
        generate_tree(tree, size)
        store_path: StorePath = runner.add_to_store(tree)
        try:
            report = Report("nar", f"NAR: serialiser and verification, {args.size_mb} MiB tree")
            code = run(runner, str(store_path), args.repeat, report)
            report.write(args.json)
            return code
        finally:
            runner.delete([store_path], check=False)


def run(runner: NixRunner, path: str, repeat: int, report: Report) -> int:
    info = runner.path_info([path])[path]
    nar_size = info.nar_size
    devnull = os.open(os.devnull, os.O_WRONLY)

    def nix_dump() -> None:
        runner.run("nix-store", "--dump", path, stdout=devnull)

    def ours_fd() -> None:
        assert write_nar(path, devnull) == nar_size

    def ours_iter() -> None:
        for chunk in iter_nar(path):
            os.write(devnull, chunk)

    nix_dump()  # warm the page cache
    assert nar_hash(path) == (info.nar_hash, nar_size), "our NAR differs from Nix's"
    t_nix, t_fd, t_iter = median_times(repeat, [nix_dump, ours_fd, ours_iter])

    chunks = list(iter_nar(path))  # the same NAR bytes for both hashing variants

    def verify() -> None:
        v = NarVerifier(info.nar_hash, nar_size, path)
        for chunk in chunks:
            v.update(chunk)
        v.finish()

    def raw_sha256() -> None:
        h = hashlib.sha256()
        for chunk in chunks:
            h.update(chunk)
        h.digest()

    t_raw, t_verify = median_times(repeat, [raw_sha256, verify])
    os.close(devnull)

    return show(report, nar_size / 1e6, repeat, (t_nix, t_fd, t_iter, t_raw, t_verify))


def show(
    report: Report, mb: float, repeat: int, times: tuple[float, float, float, float, float]
) -> int:
    """The table on stdout and the report's rows; 0 when both targets are met."""
    t_nix, t_fd, t_iter, t_raw, t_verify = times
    rows = [
        ("nix-store --dump > /dev/null", t_nix, None),
        ("ours: write_nar (fd, sendfile)", t_fd, t_nix / t_fd),
        ("ours: iter_nar chunks -> write", t_iter, t_nix / t_iter),
        ("raw hashlib.sha256", t_raw, None),
        ("ours: NarVerifier (sha256+size)", t_verify, t_raw / t_verify),
    ]
    print(f"\nNAR: {mb:.1f} MB, median of {repeat} interleaved runs\n")
    print(f"{'operation':<34} {'seconds':>8} {'MB/s':>8} {'ratio':>7}")
    for name, secs, ratio in rows:
        shown = f"{ratio:.2f}x" if ratio is not None else "-"
        print(f"{name:<34} {secs:>8.3f} {mb / secs:>8.0f} {shown:>7}")
    ser, ver = t_nix / t_fd, t_raw / t_verify
    ok = ser >= 0.5 and ver >= 0.8
    dump = {"baseline": mb / t_nix, "baseline_name": "nix-store --dump > /dev/null"}
    sha = {"baseline": mb / t_raw, "baseline_name": "raw hashlib.sha256"}
    report.row("serialiser write_nar (fd, sendfile)", mb / t_fd, "MB/s", **dump,
               target=">= 0.5x", met=ser >= 0.5)  # fmt: skip
    report.row("serialiser iter_nar chunks", mb / t_iter, "MB/s", **dump)
    report.row("streaming NAR verification (sha256 + size)", mb / t_verify, "MB/s", **sha,
               target=">= 0.8x", met=ver >= 0.8)  # fmt: skip
    report.note(f"NAR of {mb:.1f} MB; median of {repeat} interleaved runs, warm page cache")
    print(
        f"\nserializer {ser:.2f}x nix-store --dump (target >= 0.5x); "
        f"verification {ver:.2f}x raw sha256 (target >= 0.8x): {'OK' if ok else 'MISSED'}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
