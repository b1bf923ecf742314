#!/bin/sh
# Render an HTML report of `sgfused search --html` in a headless browser and save a PNG screenshot.
#
#   scripts/render_report.sh REPORT.html OUT.png [WIDTHxHEIGHT]
#
# Why: the report is checked by rendering it as a browser does (python_tests/test_retrieval.py runs it where a
# browser is installed and checks the boxes are drawn). Needs Chromium (Debian/Ubuntu: apt-get install -y chromium); set BROWSER to use
# another Chromium-family binary. The page loads offline: it has no external assets.
set -eu
if [ $# -lt 2 ]; then
    echo "usage: $0 REPORT.html OUT.png [WIDTHxHEIGHT]" >&2
    exit 2
fi
report=$1
out=$2
size=${3:-1000x800}
if [ ! -f "$report" ]; then
    echo "$0: report $report does not exist" >&2
    exit 2
fi
browser=${BROWSER:-}
if [ -z "$browser" ]; then
    for name in chromium chromium-browser google-chrome; do
        if command -v "$name" >/dev/null 2>&1; then browser=$name; break; fi
    done
fi
if [ -z "$browser" ]; then
    echo "$0: no headless browser found (install chromium, or set BROWSER)" >&2
    exit 3
fi
report_abs=$(cd "$(dirname "$report")" && pwd)/$(basename "$report")
out_abs=$(cd "$(dirname "$out")" && pwd)/$(basename "$out")
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
# --no-sandbox: the browser's sandbox cannot start as root (containers, CI); the page is a local file
"$browser" --headless --no-sandbox --disable-gpu --hide-scrollbars --force-device-scale-factor=1 \
    --user-data-dir="$profile" --window-size="$(echo "$size" | tr x ,)" --screenshot="$out_abs" \
    "file://$report_abs" >/dev/null 2>&1
if [ ! -s "$out_abs" ]; then
    echo "$0: $browser wrote no screenshot to $out" >&2
    exit 1
fi
echo "$out"
