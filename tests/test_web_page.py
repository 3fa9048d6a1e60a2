"""The web page at / in a real headless Chromium (Debian's `chromium`, driven by Playwright): pick an image, ask,
read the streamed answer from the page, ask again in the same conversation."""

import shutil
import tempfile
from pathlib import Path

import pytest
from serve_helpers import live_server

import tiny
from llava_gm.cli import main
from llava_gm.infer import Answerer
from llava_gm.serve.app import ServerOptions, create_app
from llava_gm.serve.sources import ImagePolicy

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
sync_api = pytest.importorskip("playwright.sync_api")
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium (apt-get install chromium; make test installs it)")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--no-first-run", "--disable-dev-shm-usage"]


@pytest.fixture(scope="module")
def moe_checkpoint(tmp_path_factory, tiny_model_config):
    """An untrained tiny MoE model (stage 3's layers): long answers, and experts for the page to show."""
    import dataclasses

    from llava_gm.config import SparseConfig
    from llava_gm.model.build import build_model, save_checkpoint

    model = build_model(dataclasses.replace(tiny_model_config, sparse=SparseConfig(kind="moe")))
    model.trained_keys = {n for n, _ in model.named_parameters() if not n.startswith("vision_tower.")}
    return str(save_checkpoint(model, tmp_path_factory.mktemp("moe") / "moe-ckpt"))


def test_page_uploads_an_image_asks_and_streams_the_answer(moe_checkpoint, tmp_path, capsys):
    random_checkpoint = moe_checkpoint
    image = tmp_path / "shape.png"
    tiny.draw_shape("yellow", "rectangle").save(image)
    assert main(["ask", "--checkpoint", random_checkpoint, "--image", str(image), "--question", "what color is the shape?",
                 "--max-new-tokens", "24"]) == 0
    want = capsys.readouterr().out[:-1]
    answerer = Answerer.from_checkpoint(random_checkpoint)
    app = create_app(answerer, ServerOptions(ImagePolicy()))
    profile = tempfile.mkdtemp(prefix="chromium-profile-", dir=tmp_path)
    with live_server(app) as url, sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch_persistent_context(profile, executable_path=CHROMIUM, headless=True, args=ARGS)
        try:
            page = browser.new_page()
            page.goto(url + "/?max_tokens=24")
            assert page.locator("#model").inner_text() == answerer.model_id
            page.set_input_files("#file", str(image))
            page.wait_for_selector("#preview[src^='data:image/png']")
            page.fill("#question", "what color is the shape?")
            page.click("#send")
            page.wait_for_selector(".assistant[data-state='done']", timeout=300_000)
            answer = page.locator(".assistant").first.evaluate("el => el.firstChild ? el.firstChild.nodeValue : ''")
            assert answer == want and len(want) > 3
            # MoE: each answer token's experts, per sparse layer
            assert page.locator(".experts div").count() == len(answerer.model.sparse_layers)
            assert page.locator(".experts span").count() > 0
            page.click(".relevancy")
            page.wait_for_selector(".relevancy-map", timeout=300_000)
            assert page.locator(".relevancy-map").evaluate("img => img.naturalWidth") > 50
            page.screenshot(path=str(tmp_path / "page.png"))
            # the conversation goes on: the second question is asked with the first answer as history
            page.fill("#question", "and the shape?")
            page.click("#send")
            page.wait_for_selector(".assistant:nth-of-type(4)[data-state='done']", timeout=300_000)
            assert page.locator(".msg").count() == 4 and page.locator(".error").count() == 0
        finally:
            browser.close()
    app.state.scheduler.stop()
