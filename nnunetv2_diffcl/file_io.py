"""Writing files so that a reader (or a crash) never sees half of one."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def write_text_atomic(text: str, file: str | os.PathLike) -> None:
    """Write to a temporary file in the same folder, then rename, so readers never see half a file."""
    target = Path(file)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(data: Any, file: str | os.PathLike) -> None:
    """JSON through :func:`write_text_atomic`; NaN is refused (it is not JSON)."""
    write_text_atomic(json.dumps(data, indent=2, allow_nan=False), file)
