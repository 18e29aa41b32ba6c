"""Progress bars that go quiet in scripts (``--quiet``) and when stderr is not a terminal in CI."""

from __future__ import annotations

import os
import sys


def progress(iterable=None, total=None, desc: str = "", disable: bool = False, unit: str = "it"):
    from tqdm.auto import tqdm

    quiet_env = os.environ.get("PRISM_QUIET", "").lower() in ("1", "true", "yes")
    return tqdm(
        iterable,
        total=total,
        desc=desc,
        unit=unit,
        disable=disable or quiet_env,
        file=sys.stderr,
        dynamic_ncols=True,
        leave=False,
    )
