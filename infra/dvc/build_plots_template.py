"""Build .dvc/plots-offline.html: the page `dvc plots show` writes its charts into, with the
Vega libraries inlined, so a chart draws with no network (DVC's own page loads them from a CDN).

.dvc/config names it (`plots.html_template`). The versions are the ones DVC's page loads
(dvc_render.vega.VegaRenderer.SCRIPTS), from the npm registry:

    npm pack vega@5.20.2 vega-lite@5.2.0 vega-embed@6.18.2
    python infra/dvc/build_plots_template.py vega-5.20.2.tgz vega-lite-5.2.0.tgz vega-embed-6.18.2.tgz

Each library's BSD-3-Clause licence goes into the page above its script, as it requires.
"""

from __future__ import annotations

import re
import sys
import tarfile
from pathlib import Path

OUT = Path(__file__).resolve().parents[2] / ".dvc" / "plots-offline.html"

# DVC's page (dvc_render.html.PAGE_HTML) without its {scripts} slot, where DVC would put the
# CDN <script src=...> tags; the placeholders DVC fills stay.
PAGE = """<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <title>DVC Plot</title>
<!-- Built by infra/dvc/build_plots_template.py: DVC's plots page with %s inlined. -->
%s
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


def inline_script(tarball: Path) -> tuple[str, str]:
    """(name@version, the <script> element with the licence above it) of one npm tarball."""
    name, version = re.fullmatch(r"(.+)-(\d+\.\d+\.\d+)\.tgz", tarball.name).groups()
    with tarfile.open(tarball) as tar:
        source = tar.extractfile(f"package/build/{name}.min.js").read().decode()
        licence = tar.extractfile("package/LICENSE").read().decode().strip()
    # The source map is not shipped: a browser's developer tools would look for it.
    source = re.sub(r"\n//# sourceMappingURL=\S+\s*$", "\n", source)
    assert "</script" not in source and "{plot_divs}" not in source, tarball
    return (
        f"{name}@{version}",
        f"<!-- {name} {version}\n{licence}\n-->\n<script>\n{source}</script>",
    )


def main(tarballs: list[str]) -> None:
    built = [inline_script(Path(t)) for t in tarballs]
    names = ", ".join(name for name, _ in built)
    OUT.write_text(PAGE % (names, "\n".join(script for _, script in built)), encoding="utf8")
    print(f"{OUT}: {names}")


if __name__ == "__main__":
    main(sys.argv[1:])
