"""Private key files that group or others can access are refused, by the CLI too."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from mesh.control_plane import TrustRoot, save_trust_root

BIN = Path(sys.executable).parent


def test_identity_issue_refuses_a_root_key_readable_by_others(tmp_path: Path) -> None:
    """`mesh-policy identity issue` with a 0644 root.key exits 2 with `InvalidArgument: ...`
    naming the file, its mode and `chmod 600`, no traceback, and writes no identity."""
    keys = save_trust_root(TrustRoot.generate(), tmp_path / "keys")
    root_key = keys / "root.key"
    root_key.chmod(0o644)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}

    result = subprocess.run(
        [str(BIN / "mesh-policy"), "identity", "issue", "bob", "--root", str(keys),
         "--out", str(tmp_path / "bob")],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip

    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.strip() == (
        f"InvalidArgument: {root_key}: private key file is accessible to group or others "
        f"(mode 0644); fix it with: chmod 600 {root_key}"
    )
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "bob").exists()
