"""OCI images for the node, built offline and imported into its containerd.

The sandbox ("pause") image is one static binary built from the Kubernetes source tree by
`scripts/setup-kube.sh`; the platform's own image comes from `scripts/build-image.sh`. Both
are OCI archives packed with umoci; no registry is ever contacted (pods use
`imagePullPolicy: Never`).
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from .layout import PAUSE_IMAGE, Layout, kube_cache
from .runtime import image_present, import_image

REPO_ROOT = Path(__file__).resolve().parents[2]
NIPHAS_IMAGE = "niphas.local/niphas:dev"
NIPHAS_ARCHIVE = Path("/var/cache/niphas/image/niphas.oci.tar")


def pack_single_binary(binary: Path, tag: str, out: Path) -> None:
    """An OCI archive of one image holding only `binary` at `/<name>`, its entrypoint."""
    with tempfile.TemporaryDirectory(prefix="niphas-image-") as tmp:
        oci, bundle = Path(tmp) / "oci", Path(tmp) / "bundle"
        image = f"{oci}:{tag}"
        _umoci("init", "--layout", str(oci))
        _umoci("new", "--image", image)
        _umoci("unpack", "--image", image, str(bundle))
        shutil.copy2(binary, bundle / "rootfs" / binary.name)
        _umoci("repack", "--image", image, str(bundle))
        _umoci("config", "--image", image, f"--config.entrypoint=/{binary.name}")
        subprocess.run(["tar", "-C", str(oci), "-cf", str(out), "."], check=True)


def ensure_pause_image(layout: Layout) -> None:
    if image_present(layout, PAUSE_IMAGE):
        return
    binary = kube_cache() / "pause"
    if not binary.exists():
        raise RuntimeError(f"{binary} is missing: run scripts/setup-kube.sh")
    with tempfile.TemporaryDirectory(prefix="niphas-pause-") as tmp:
        archive = Path(tmp) / "pause.tar"
        pack_single_binary(binary, PAUSE_IMAGE.rsplit(":", 1)[1], archive)
        import_image(layout, archive, PAUSE_IMAGE)


def import_niphas_image(layout: Layout, archive: Path = NIPHAS_ARCHIVE) -> bool:
    """Import the platform's image when it was built (`make image`) and is newer than the
    copy in containerd; returns whether the node has it."""
    stamp = layout.containerd_root / "niphas-image.imported"
    if not archive.exists():
        return image_present(layout, NIPHAS_IMAGE)
    current = f"{archive.stat().st_mtime_ns}:{archive.stat().st_size}"
    if image_present(layout, NIPHAS_IMAGE) and stamp.exists() and stamp.read_text() == current:
        return True
    import_image(layout, archive, NIPHAS_IMAGE)
    stamp.write_text(current)
    return True


def _umoci(*args: str) -> None:
    done = subprocess.run(["umoci", *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"umoci {args[0]} failed: {done.stderr.strip()[-400:]}")
