"""A picture of the search page as a browser shows it: serves INDEX on a free local port, opens
``/?q=QUERY&k=K`` in headless Chromium (Debian's ``chromium`` package) and saves the screenshot.

    python tools/screenshot_search.py --index idx --query "a woman in a red coat" --out page.png
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import threading
import urllib.parse
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gallery.server import SearchServer  # noqa: E402
from search import open_searcher  # noqa: E402
from utils.errors import UserError, run_cli  # noqa: E402
from utils.iotools import resolve_device  # noqa: E402


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--index", required=True, type=Path)
    parser.add_argument("--query", required=True)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("search_page.png"))
    parser.add_argument("--config_file", help="the run that made the index, if it moved")
    parser.add_argument("--chromium", default="chromium", help="browser executable")
    parser.add_argument("--window", default="1400,900", help="window size, WIDTH,HEIGHT")
    args = parser.parse_args(argv)
    browser = shutil.which(args.chromium)
    if browser is None:
        raise UserError(f"{args.chromium} not found; install Debian's chromium package (apt-get install chromium)")
    server = SearchServer(open_searcher(args.index, args.config_file, resolve_device("auto")), ("127.0.0.1", 0))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/?" + urllib.parse.urlencode({"q": args.query, "k": args.k})
    try:
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        f"--window-size={args.window}", "--virtual-time-budget=10000",
                        f"--screenshot={args.out.resolve()}", url], check=True, capture_output=True, timeout=120)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as err:
        raise UserError(f"{browser} failed on {url}: {err}") from None
    finally:
        server.shutdown()
        server.server_close()
    print(f"{url} -> {args.out}")
    return args.out


if __name__ == "__main__":
    sys.exit(run_cli(main))
