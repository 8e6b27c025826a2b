"""Screenshot of mmdlm-web answering one image (docs/web_demo.png), taken in the system's headless Chromium.

    python scripts/web_screenshot.py --model runs/demo/caption/model --image runs/demo/world/test/images/000000.png \
        [--question "What colour is the circle?" | --caption] [--output docs/web_demo.png]

The page runs on a free 127.0.0.1 port and stops afterwards; the PNG is saved with a 256-colour palette
(a few tens of kB instead of ~100).
"""

from __future__ import annotations

import argparse
import io
import shutil
import sys

from PIL import Image

from mmdlm.infer.loadtest import free_port
from mmdlm.infer.web import launch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--image", required=True)
    p.add_argument("--question", help="ask this (default: press Caption)")
    p.add_argument("--caption", action="store_true", help="press Caption (the default)")
    p.add_argument("--output", default="docs/web_demo.png")
    p.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    args = p.parse_args(argv)
    from playwright.sync_api import sync_playwright

    page_args = argparse.Namespace(model=args.model, host="127.0.0.1", port=free_port(), max_batch_size=4,
                                   device="cpu", max_tokens=64)
    demo, batcher, url = launch(page_args, block=False)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=args.chromium, args=["--no-sandbox"])  # root: no sandbox
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(url)
            page.set_input_files("#image input[type=file]", args.image)
            page.wait_for_selector("#image img", timeout=60_000)
            if args.question:
                page.fill("#question textarea", args.question)
                page.click("#ask")
            else:
                page.click("#caption")
            page.wait_for_function("document.querySelector('#stats').innerText.includes('forward(s)')",
                                   timeout=300_000)
            page.wait_for_timeout(1500)  # the animation's first frame
            shot = page.screenshot(full_page=True)
            print(page.input_value("#answer textarea"))
            browser.close()
    finally:
        demo.close()
        batcher.close()
    image = Image.open(io.BytesIO(shot)).convert("RGB").quantize(256)
    image.save(args.output, optimize=True)
    print(f"{args.output}: {image.size[0]}x{image.size[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
