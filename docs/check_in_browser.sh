#!/usr/bin/env bash
# Build the site strictly, serve it on localhost and take screenshots of three pages with headless Chromium
# (Debian's `chromium` package: apt-get install -y chromium), driven by docs/browser_check.py: it waits for and checks
# what a reader must see (navigation, search results, highlighted code, the figures, the typeset math) and fails
# naming what did not render. Then look at the screenshots. Needs no network beyond localhost (no Google fonts,
# MathJax is served by the site).
#
#   bash docs/check_in_browser.sh            # writes docs/screenshots/*.png (ignored by git)
#   PORT=8123 bash docs/check_in_browser.sh
set -euo pipefail
cd "$(dirname "$0")/.."

port=${PORT:-8765}
out=docs/screenshots
browser=${CHROMIUM:-chromium}
command -v "$browser" >/dev/null || { echo "check_in_browser: no $browser (apt-get install -y chromium)" >&2; exit 1; }

NO_MKDOCS_2_WARNING=1 mkdocs build --strict --quiet
mkdir -p "$out"

python -m http.server "$port" --bind 127.0.0.1 --directory site >/dev/null 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null || true' EXIT
for _ in $(seq 50); do
  python - "$port" <<'PY' && break
import sys, urllib.request
try:
    urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/", timeout=1)
except OSError:
    sys.exit(1)
PY
  sleep 0.2
done

python docs/browser_check.py --base "http://127.0.0.1:$port" --out "$out" --chromium "$browser"
