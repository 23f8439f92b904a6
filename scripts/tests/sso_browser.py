"""A browser for the single sign-on tests: from our server's /v1/auth/sso/ORG/start, through a
loopback OpenID provider's development login and consent pages (signing in as EMAIL), up to the
redirect back to our callback, whose URL it prints without following it (the test calls it,
after tampering with it when that is the point).

    sso_browser.py START_URL EMAIL
"""

import re
import sys
from html import unescape
from urllib.parse import urljoin

import requests


def main() -> None:
    start, email = sys.argv[1], sys.argv[2]
    with requests.Session() as c:
        r = c.get(start, allow_redirects=False, timeout=30)
        assert r.status_code == 302, (r.status_code, r.text)
        url = r.headers["location"]
        callback = start.split("/v1/auth/sso/")[0] + "/v1/auth/sso/callback"
        for _ in range(20):
            if url.startswith(callback):
                print(url)
                return
            r = c.get(url, allow_redirects=False, timeout=30)
            if r.status_code in (302, 303):
                url = urljoin(url, r.headers["location"])
                continue
            form = re.search(r'<form[^>]*action="([^"]+)"', r.text)
            assert r.status_code == 200 and form, (r.status_code, r.text[:2000])
            fields = dict(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)"', r.text))
            fields.update({"login": email, "password": "unused"})
            r = c.post(urljoin(url, unescape(form.group(1))), data=fields, allow_redirects=False, timeout=30)
            assert r.status_code in (302, 303), (r.status_code, r.text[:2000])
            url = urljoin(url, r.headers["location"])
        raise SystemExit("the provider never sent the browser back")


if __name__ == "__main__":
    main()
