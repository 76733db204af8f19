"""Screenshots of a running dashboard for the README: `python docs/take_screenshots.py`.

Start the app first (`streamlit run app.py`, on this machine, so the owner pages are open
without a password), then run this with the URL it printed. It opens the layer browser, one
neuron, the analysis page and the compare page in headless Chromium (/usr/bin/chromium, as
the browser tests do) and saves a PNG of each under docs/screenshots/.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from urllib.parse import urlencode

OUT = Path(__file__).resolve().parent / "screenshots"


def wait_ready(page, selector: str, timeout: float = 180.0) -> None:
    """Until ``selector`` is drawn, the script has stopped and every image in the main area has decoded."""
    page.wait_for_selector(selector, timeout=timeout * 1000)
    deadline, quiet_since = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        busy = page.locator('[data-testid="stStatusWidget"]').count() > 0 or page.evaluate(
            "() => Array.from(document.querySelectorAll('[data-testid=\"stMain\"] img')).some(i => !i.complete)")
        if busy:
            quiet_since = None
        elif quiet_since is None:
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since > 1.5:
            return
        time.sleep(0.2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://localhost:8501")
    parser.add_argument("--model", default="offline:mobilenet_v2")
    parser.add_argument("--probe", default="demo")
    parser.add_argument("--layer", default="features.18")
    parser.add_argument("--neuron", type=int, default=0, help="the neuron page's neuron (pick one DnD labelled)")
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args()

    from playwright.sync_api import sync_playwright

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common = {"model": args.model, "probe": args.probe, "layer": args.layer}
    shots = [
        ("browser", "", common, 1500, '[data-testid="stMain"] img'),
        ("neuron", "neuron", {**common, "neuron": str(args.neuron)}, 2600, '[data-testid="stPlotlyChart"]'),
        ("analysis", "analysis", {"model": args.model, "probe": args.probe}, 1700, '[data-testid="stPlotlyChart"]'),
    ]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1500, "height": 1000}, device_scale_factor=1)
        for name, path, params, height, drawn in shots:
            page.set_viewport_size({"width": 1500, "height": height})
            page.goto(f"{args.url.rstrip('/')}/{path}?{urlencode(params)}")
            wait_ready(page, drawn)
            page.screenshot(path=str(out / f"{name}.png"))
            print(f"saved {out / f'{name}.png'}")
            if name == "analysis":  # the chart alone, for the README
                page.locator(drawn).first.screenshot(path=str(out / "analysis_chart.png"))
                print(f"saved {out / 'analysis_chart.png'}")
        browser.close()


if __name__ == "__main__":
    main()
