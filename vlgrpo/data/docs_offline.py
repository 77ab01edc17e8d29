"""Great Expectations Data Docs that render offline: their CDN styles and scripts served from the site itself.

GE's page templates load Bootstrap, jQuery, Font Awesome, bootstrap-table, a date picker and Vega from public
CDNs; opened offline (or from an MLflow artifact store) the pages come up unstyled and the index page's tables
empty, because bootstrap-table builds them in the browser from data in the page. ``make_offline(site)`` copies
the assets that pinned Python packages ship (XStatic-Bootstrap, XStatic-jQuery, XStatic-Font-Awesome) into
``<site>/static/vendor/``, points every page at them with relative paths, and replaces bootstrap-table with
``vlgrpo-table.js`` (beside this module): a small jQuery plugin that renders the same table from the same data,
with GE's row links. What none of the pages here use (Vega charts, the date-picker filter, the dark theme) is
dropped. Without those packages installed the site is left as GE wrote it (the CDN links), never broken.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

VENDOR = Path("static") / "vendor"
SHIM = Path(__file__).with_name("vlgrpo-table.js")

# CDN address (a regex over the URL) -> the vendored file that replaces it; None drops the tag.
REPLACE: list[tuple[str, str | None]] = [
    (r"/bootstrap/[\d.]+/css/bootstrap(\.min)?\.css$", "bootstrap.min.css"),
    (r"/bootstrap/[\d.]+/js/bootstrap(\.min)?\.js$", "bootstrap.bundle.min.js"),   # the bundle has Popper
    (r"/popper\.js/", None),
    (r"/jquery-[\d.]+(\.min)?\.js$", "jquery.min.js"),
    (r"/font-awesome/[\d.]+/css/all(\.min)?\.css$", "fontawesome/css/all.min.css"),
    (r"/bootstrap-table@[\d.]+/dist/bootstrap-table(\.min)?\.js$", "vlgrpo-table.js"),
    (r"/bootstrap-table@", None),                   # its CSS and the filter-control extension
    (r"/bootstrap-datepicker/", None),
    (r"/bootstrap-dark@", None),
    (r"/npm/vega(-lite|-embed)?@", None),
]
# GE's navbar logo comes from its web-assets bucket; the site's own static/images has the same file.
_LOGO = re.compile(r'src="https://great-expectations-web-assets[^"/]*/([\w.-]+?)(?:\?[^"]*)?"')
# GE's own static files, by a relative path that GE gets one level short on the validation pages (favicon).
_STATIC = re.compile(r'\b(href|src)="(?:\.\.?/)*static/([^"]+)"')
_TAG = re.compile(r'<(link|script)\b[^>]*?\b(?:href|src)="(https?://[^"]+)"[^>]*>(\s*</script>)?', re.S)


def vendored_assets() -> dict[str, Path] | None:
    """Vendored name -> source file or folder; None when the XStatic packages are not installed."""
    try:
        import xstatic.pkg.bootstrap as bootstrap
        import xstatic.pkg.font_awesome as font_awesome
        import xstatic.pkg.jquery as jquery
    except ImportError:
        return None
    bs, fa, jq = Path(bootstrap.BASE_DIR), Path(font_awesome.BASE_DIR), Path(jquery.BASE_DIR)
    return {"bootstrap.min.css": bs / "css" / "bootstrap.min.css",
            "bootstrap.bundle.min.js": bs / "js" / "bootstrap.bundle.min.js",
            "jquery.min.js": jq / "jquery.min.js",
            "fontawesome/css/all.min.css": fa / "css" / "all.min.css",
            "fontawesome/webfonts": fa / "webfonts",
            "vlgrpo-table.js": SHIM}


def make_offline(site: Path) -> list[str]:
    """Rewrite the Data Docs site under ``site`` to load nothing from the network; returns the CDN URLs that
    were left (empty when every page is offline-clean). Idempotent."""
    site = Path(site)
    assets = vendored_assets()
    if assets is None:
        return sorted({m.group(2) for p in site.rglob("*.html") for m in _TAG.finditer(p.read_text("utf-8"))})
    vendor = site / VENDOR
    for name, src in assets.items():
        dest = vendor / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():  # the web fonts: woff2 only, which every browser that runs these pages reads
            dest.mkdir(exist_ok=True)
            for f in src.glob("*.woff2"):
                shutil.copyfile(f, dest / f.name)
        else:
            shutil.copyfile(src, dest)
    left: set[str] = set()
    for page in site.rglob("*.html"):
        rel = Path(os.path.relpath(vendor, page.parent)).as_posix()
        static = Path(os.path.relpath(site / "static", page.parent)).as_posix()
        text = _STATIC.sub(lambda m: f'{m.group(1)}="{static}/{m.group(2)}"', page.read_text("utf-8"))
        text = _LOGO.sub(lambda m: f'src="{static}/images/{m.group(1)}"', text)

        def local(m: re.Match[str]) -> str:
            kind, url = m.group(1), m.group(2)
            for pattern, name in REPLACE:
                if re.search(pattern, url):
                    if name is None:
                        return ""
                    if kind == "link":
                        return f'<link rel="stylesheet" href="{rel}/{name}">'
                    return f'<script src="{rel}/{name}"></script>'
            left.add(url)
            return m.group(0)

        page.write_text(_TAG.sub(local, text), "utf-8")
    return sorted(left)
