"""Check the review page in a real browser: serve a collection, choose a query in the page with headless Chromium
(Debian's /usr/bin/chromium, a phone's viewport), wait for the result, write a screenshot and print what it shows.

    python scripts/review_screenshot.py --out runs/review.png     # the demo photos as the collection (see --help)
"""
from pair_vit import cli
from pair_vit.serve import shot

if __name__ == "__main__":
    cli.main(shot.ScreenshotConfig, shot.run)
