"""Build plots/offline-template.html: DVC's plot page with Vega, Vega-Lite and vega-embed inlined, so
`dvc plots show` / `dvc plots diff` draw the curves and the confusion matrix with no network (DVC's own
page loads them from a CDN). .dvc/config points DVC at the result (plots.html_template).

    cd /tmp && npm pack vega@5.20.2 vega-lite@5.2.0 vega-embed@6.18.2      # the versions DVC's page names
    python plots/build_offline_template.py /tmp/vega-5.20.2.tgz /tmp/vega-lite-5.2.0.tgz /tmp/vega-embed-6.18.2.tgz

All three are BSD-3-Clause; each license is kept in the page beside its library.
"""

from __future__ import annotations

import sys
import tarfile
from pathlib import Path

LIBRARIES = {
    "vega": "build/vega.min.js",
    "vega-lite": "build/vega-lite.min.js",
    "vega-embed": "build/vega-embed.min.js",
}
OUT = Path(__file__).with_name("offline-template.html")

PAGE = """<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <meta charset="utf-8">
    <title>DVC Plot (offline)</title>
    <!-- No scripts placeholder: DVC would put its CDN script tags there. The libraries are inlined below. -->
{libraries}
    <style>
        table {
            border-spacing: 15px;
        }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


def member(archive: Path, name: str) -> str:
    with tarfile.open(archive) as tar:
        extracted = tar.extractfile(f"package/{name}")
        assert extracted is not None, f"{archive} has no package/{name}"
        return extracted.read().decode("utf-8")


def main(archives: list[str]) -> None:
    blocks = []
    for archive in map(Path, archives):
        library = next(name for name in sorted(LIBRARIES, key=len, reverse=True) if archive.name.startswith(name + "-"))
        code, license_text = member(archive, LIBRARIES[library]), member(archive, "LICENSE")
        assert "</script" not in code, f"{library} cannot be inlined as is"
        blocks.append(
            f"    <!-- {archive.name[:-4]}, {LIBRARIES[library]}:\n{license_text.replace('--', '- -')}\n    -->\n"
            f"    <script>{code}</script>"
        )
    order = {name: i for i, name in enumerate(LIBRARIES)}  # vega, then vega-lite, then vega-embed
    blocks.sort(key=lambda block: order[block.split(",")[0].split()[-1].rsplit("-", 1)[0]])
    OUT.write_text(PAGE.replace("{libraries}", "\n".join(blocks)))
    print(f"wrote {OUT} ({OUT.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main(sys.argv[1:])
