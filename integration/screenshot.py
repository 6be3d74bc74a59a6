"""Screenshot a Label Studio page as a logged-in user, in Debian's Chromium (`make labelstudio-screenshot`).

Run by integration/test_label_studio.py with Label Studio's own Python, where playwright is
installed: python screenshot.py BASE_URL EMAIL PASSWORD PATH OUT.png
"""

import sys

from playwright.sync_api import sync_playwright

base_url, email, password, path, out = sys.argv[1:6]
with sync_playwright() as p:
    browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.goto(f"{base_url}/user/login/")
    page.fill('input[name="email"]', email)
    page.fill('input[name="password"]', password)
    page.click('button[type="submit"]')
    page.wait_for_load_state("networkidle")
    page.goto(base_url + path)
    page.wait_for_load_state("networkidle")
    page.wait_for_timeout(3000)  # the labelling view renders after the page loads
    page.screenshot(path=out)
    browser.close()
