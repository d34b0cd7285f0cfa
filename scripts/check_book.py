"""Look at the built book in a real headless browser: console errors, broken internal links, clipped content.

    python scripts/check_book.py [_build/html] [--shots DIR] [--pages book/intro.html ...]

Serves the HTML folder on a local port, opens every page (or the ones given) in headless Chromium at 1280 px and
at phone width (390 px), and reports per page:

* console errors and uncaught page errors (a script error on every page is a build problem);
* internal links (``href`` to a file of the book, with or without ``#anchor``) whose file or anchor is missing;
* content wider than its box that cannot be scrolled (tables, code, outputs cut off at the edge);
* raw LaTeX (``\\ln``, ``$...$``) left in the navigation, where no MathJax renders it.

With ``--shots DIR`` it writes full-page screenshots ``DIR/<page>_<width>.png`` to look at. Exit status 1 when
anything was found. Needs Playwright and a Chromium (``pip install playwright``, Chromium from the system's
package manager, found on PATH as ``chromium``); neither is a dependency of the package.
"""
from __future__ import annotations

import argparse
import functools
import http.server
import shutil
import sys
import threading
from pathlib import Path
from urllib.parse import urldefrag, urljoin, urlparse

WIDTHS = {"desktop": 1280, "phone": 390}

# Elements wider than their box whose overflow is not scrollable: what a reader cannot see.
CLIPPED_JS = """
() => {
  const out = [];
  for (const el of document.querySelectorAll('article pre, article table, article .cell_output, article img, article mjx-container[display=true]')) {
    const r = el.getBoundingClientRect();
    if (r.width === 0) continue;
    let clipped = false;
    for (let p = el; p && p !== document.body; p = p.parentElement) {
      const cs = getComputedStyle(p);
      const scrollable = ['auto', 'scroll'].includes(cs.overflowX);
      if (p.scrollWidth > p.clientWidth + 1 && !scrollable && cs.overflowX !== 'visible') { clipped = true; break; }
      if (scrollable) break;
    }
    const main = document.querySelector('article');
    const mr = main ? main.getBoundingClientRect() : {right: window.innerWidth};
    if (clipped || (r.right > Math.max(mr.right, window.innerWidth) + 2 && getComputedStyle(el).overflowX !== 'auto'))
      out.push(el.tagName.toLowerCase() + (el.className ? '.' + String(el.className).split(' ')[0] : '') +
               ': ' + (el.innerText || el.alt || '').slice(0, 60).replace(/\\s+/g, ' '));
  }
  return out;
}
"""

NAV_LATEX_JS = """
() => Array.from(document.querySelectorAll('nav a, .bd-sidebar a, title'))
       .map(a => a.textContent).filter(t => /\\\\[a-zA-Z]+|\\$[^$]+\\$/.test(t))
"""


def pages_of(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*.html")
                  if "_static" not in p.parts and "_sources" not in p.parts and p.name != "index.html")


def serve(root: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=str(root))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, f"http://127.0.0.1:{httpd.server_address[1]}/"


def check_links(root: Path, base: str, page_url: str, hrefs: list[str], ids_of) -> list[str]:
    bad = []
    for href in hrefs:
        url, frag = urldefrag(urljoin(page_url, href))
        if not url.startswith(base):
            continue
        rel = urlparse(url).path[1:] or "index.html"
        target = root / rel
        if target.is_dir():
            target = target / "index.html"
        if not target.exists():
            bad.append(f"missing file: {href}")
        elif frag and target.suffix == ".html" and frag not in ids_of(target):
            bad.append(f"missing anchor: {href}")
    return bad


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("html", nargs="?", default="_build/html", help="the built book (default _build/html)")
    ap.add_argument("--shots", help="write full-page screenshots into this folder")
    ap.add_argument("--pages", nargs="*", help="pages relative to the HTML folder (default: every page)")
    args = ap.parse_args(argv)

    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sys.exit("check_book.py needs Playwright: pip install playwright (and a Chromium on PATH)")
    browser_path = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    root = Path(args.html).resolve()
    if not (root / "searchindex.js").exists():
        sys.exit(f"{root} is not a built book (no searchindex.js); run `make book` first")
    pages = args.pages or pages_of(root)
    shots = Path(args.shots) if args.shots else None
    if shots:
        shots.mkdir(parents=True, exist_ok=True)

    import re
    id_cache: dict[Path, set[str]] = {}

    def ids_of(path: Path) -> set[str]:
        if path not in id_cache:
            id_cache[path] = set(re.findall(r'\bid="([^"]+)"', path.read_text(errors="replace")))
        return id_cache[path]

    httpd, base = serve(root)
    problems = 0
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
            for page_name in pages:
                found: list[str] = []
                for label, width in WIDTHS.items():
                    page = browser.new_page(viewport={"width": width, "height": 900})
                    errors: list[str] = []
                    page.on("console", lambda m: errors.append(f"console {m.type}: {m.text}")
                            if m.type == "error" else None)
                    page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
                    url = base + page_name
                    page.goto(url, wait_until="networkidle")
                    page.wait_for_timeout(300)
                    # the offline book loads nothing from the network: requests that fail offline are not errors
                    found += [f"[{label}] {e}" for e in errors if "net::ERR" not in e]
                    found += [f"[{label}] clipped {c}" for c in page.evaluate(CLIPPED_JS)]
                    if label == "desktop":
                        hrefs = page.eval_on_selector_all("a[href]", "els => els.map(e => e.getAttribute('href'))")
                        found += check_links(root, base, url, hrefs, ids_of)
                        found += [f"raw LaTeX in navigation: {t.strip()}" for t in page.evaluate(NAV_LATEX_JS)]
                    if shots:
                        page.screenshot(path=str(shots / f"{page_name.replace('/', '_')[:-5]}_{width}.png"),
                                        full_page=True)
                    page.close()
                found = list(dict.fromkeys(found))
                problems += len(found)
                print(f"{'ok ' if not found else 'BAD'} {page_name}")
                for f in found:
                    print(f"      {f}".encode("utf-8", "replace").decode())
            browser.close()
    finally:
        httpd.shutdown()
    print(f"{len(pages)} pages, {problems} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
