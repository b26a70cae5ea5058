"""``python -m mesh._core.policy --export-schema schemas/policy.schema.json``: write the policy
JSON Schema (``render_schema``), as the schema drift test (``tests/unit/test_schemas.py``) says
to when the models change."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from mesh._core.policy.load import render_schema


def _main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mesh._core.policy")
    parser.add_argument(
        "--export-schema", metavar="PATH", required=True, help="write the policy JSON Schema"
    )
    args = parser.parse_args(argv)
    Path(args.export_schema).write_text(render_schema(), encoding="utf-8")
    print(f"wrote {args.export_schema}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(_main())
