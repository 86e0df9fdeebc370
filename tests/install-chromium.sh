#!/bin/sh
# Headless Chromium for tests/test_report.py, which renders the HTML report in a real browser. Installs
# Debian's package when it is missing and this is Debian run as root; otherwise those tests skip, saying why.
command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1 && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && grep -qi debian /etc/os-release 2>/dev/null; then
    echo "installing chromium (Debian package) for the report's browser tests" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null \
        || echo "could not install chromium: the report's browser tests will skip" >&2
else
    echo "no chromium (installed automatically only on Debian as root): the report's browser tests will skip" >&2
fi
exit 0
