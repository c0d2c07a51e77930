"""A small real copy of CIFAR-10 for the notebooks' smoke runs; prints the folder for CIFAR_DATA_DIR.

    CIFAR_DATA_DIR=$(python ci/data.py DEST)

Where ../shared holds the JPEG copy (this project's machines): its first 60 images per class, in
DEST/jpeg-60. Elsewhere (GitHub): the archive through helpers.download (mirrors, md5) into DEST, which
the workflow caches; a DEST that holds it already downloads nothing.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACK = ROOT.parent / "shared" / "data" / "cifar10-jpeg.pack"


def small_copy(dest: Path, pack: Path = PACK, urls: Sequence[str] | None = None,
               md5: str | None = None) -> Path:
    """The folder to read: the pack's 60-per-class subset, else DEST with the downloaded archive."""
    if pack.is_file():
        subset = dest / "jpeg-60"
        shutil.rmtree(subset, ignore_errors=True)
        tool = pack.parent.parent / "tools" / "cifar10_jpeg.py"
        unpack = [sys.executable, str(tool), "unpack", str(subset), "--limit", "60"]
        if subprocess.run(unpack, stdout=subprocess.DEVNULL).returncode != 0:  # it said why
            shutil.rmtree(subset, ignore_errors=True)
            raise SystemExit(2)
        return subset
    from helpers.download import CIFAR10_MD5, download_cifar10

    return download_cifar10(dest, urls, md5 or CIFAR10_MD5, progress=False)


def main(argv: list[str], pack: Path = PACK) -> int:
    from helpers.download import DownloadError

    if len(argv) != 1:
        print("error: usage: python ci/data.py DEST", file=sys.stderr)
        return 2
    try:
        print(small_copy(Path(argv[0]).absolute(), pack))  # absolute: the notebooks' tests change folder
    except DownloadError as err:
        print(f"error: ci/data.py: {err}".replace("\n", " "), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))  # helpers, from the repository this script is in
    sys.exit(main(sys.argv[1:]))
