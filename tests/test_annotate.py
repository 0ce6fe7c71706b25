"""The annotation / review / blind-ranking server: its files, refusals, concurrency, the ranking
report, and the page itself in a real headless browser (Debian's chromium + chromedriver)."""

import contextlib
import hashlib
import json
import os
import shutil
import threading
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from evafusion_jax import annotate as an
from evafusion_jax.data import feedback as fd

REPO = Path(__file__).resolve().parent.parent
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
SCREENSHOT = REPO / "docs" / "annotate.png"


def _inputs(root: Path, n: int = 3, size: int = 64) -> dict:
    """Synthetic IR/visible pairs and three 'methods' fusing them differently."""
    from evafusion_jax.data import synthetic
    synthetic.write_pairs_folder(root / "src", n, size, size, seed=1)
    methods = {}
    for name in ("mean", "max", "noisy"):
        d = root / "fused" / name
        d.mkdir(parents=True)
        methods[name] = d
    rng = np.random.default_rng(0)
    for f in sorted((root / "src" / "ir").iterdir()):
        ir = np.asarray(Image.open(f).convert("L"), np.float32) / 255
        vi = np.asarray(Image.open(root / "src" / "vi" / f.name).convert("L"), np.float32) / 255
        outs = {"mean": (ir + vi) / 2, "max": np.maximum(ir, vi),
                "noisy": (ir + vi) / 2 + rng.normal(0, 0.15, ir.shape)}
        for name, a in outs.items():
            Image.fromarray(np.uint8(np.clip(a, 0, 1) * 255)).save(methods[name] / f.name)
    return {"ir": root / "src" / "ir", "vi": root / "src" / "vi", "fused": methods}


@pytest.fixture
def inputs(tmp_path):
    return _inputs(tmp_path / "in")


@contextlib.contextmanager
def _serving(app):
    server = an.make_server(app)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield "http://127.0.0.1:%d" % server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def _req(base, path, body=None, method=None, raw=None, headers=None):
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(base + path, data=data, method=method or ("POST" if data is not None
                                                                           else "GET"),
                                 headers=headers or {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != an.LOCK_FILE}


GOOD = {"Thermal Retention": 4, "Texture Preservation": 3, "Artifacts": 5, "Sharpness": 4,
        "Overall Score": 4}


def test_bad_requests_get_4xx_and_change_nothing(inputs, tmp_path):
    out = tmp_path / "fb"
    app = an.build_app(inputs["ir"], inputs["vi"], inputs["fused"], out)
    with _serving(app) as base:
        st, items = _req(base, "/api/items?who=ann")
        assert st == 200 and items["count"] == 9 and items["done"] == 0
        iid = items["items"][0]["id"]
        # the page never names a method: not in ids, item data or image URLs
        st, item = _req(base, f"/api/item?id={iid}&who=ann")
        assert st == 200 and item["width"] == 64 and item["scores"] is None
        assert not any(m in json.dumps(item) + json.dumps(items) for m in ("mean", "max", "noisy"))
        # one good submit, so that "nothing changed" also covers an existing scores.jsonl
        st, res = _req(base, "/api/submit", {"id": iid, "who": "ann", "scores": GOOD, "circles": []})
        assert st == 200 and res["saved"] and res["done"] == 1
        before = _snapshot(out)
        bad = [
            ({"raw": b"{not json"}, 400, "not valid JSON"),
            ({"body": [1, 2]}, 400, "JSON object"),
            ({"body": {"id": iid, "who": "ann", "scores": GOOD}}, 200, None),  # circles optional
            ({"body": {"id": iid, "who": "", "scores": GOOD}}, 400, "annotator"),
            ({"body": {"id": iid, "who": "a/b", "scores": GOOD}}, 400, "annotator"),
            ({"body": {"id": "nope", "who": "ann", "scores": GOOD}}, 404, "no image"),
            ({"body": {"id": iid, "who": "ann", "scores": dict(GOOD, Sharpness=6)}}, 400, "1 to 5"),
            ({"body": {"id": iid, "who": "ann", "scores": dict(GOOD, Sharpness=3.5)}}, 400, "whole"),
            ({"body": {"id": iid, "who": "ann", "scores": {"Sharpness": 3}}}, 400, "exactly the keys"),
            ({"body": {"id": iid, "who": "ann", "scores": GOOD, "extra": 1}}, 400, "unknown field"),
            ({"body": {"id": iid, "who": "ann", "scores": GOOD, "circles": [{"x": 1, "y": 2}]}},
             400, "circles[0]"),
            ({"body": {"id": iid, "who": "ann", "scores": GOOD,
                       "circles": [{"x": 10, "y": 10, "r": -1}]}}, 400, "r <= 0"),
            ({"body": {"id": iid, "who": "ann", "scores": GOOD,
                       "circles": [{"x": 100, "y": 10, "r": 3}]}}, 400, "outside"),
            ({"body": {"id": iid, "who": "ann", "scores": GOOD, "circles": "x"}}, 400, "list"),
            ({"body": {"id": iid, "who": "ann", "order": ["A"]}, "path": "/api/rank"}, 400,
             "--rank"),
            ({"raw": b"x" * (an.MAX_BODY + 1)}, 413, "limit"),
            ({"method": "GET"}, 405, "POST only"),
            ({"path": "/api/nothing", "method": "GET"}, 404, "no such"),
            ({"path": "/img/0000.png", "method": "GET"}, 404, "no image"),
            ({"body": {"id": iid, "who": "ann", "scores": GOOD},
              "headers": {"Content-Type": "text/plain"}}, 415, "application/json"),
            ({"body": {"id": iid, "who": "ann", "scores": GOOD},
              "headers": {"Content-Type": "application/json", "Host": "evil.example:80"}}, 403,
             "not this machine"),
        ]
        for spec, code, msg in bad:
            path = spec.get("path", "/api/submit")
            if code == 200:  # the valid variant is checked separately below
                continue
            st, res = _req(base, path, body=spec.get("body"), raw=spec.get("raw"),
                           method=spec.get("method"), headers=spec.get("headers"))
            assert st == code, (spec, st, res)
            assert msg in res["error"], (spec, res)
        assert _snapshot(out) == before
        recs = [json.loads(x) for x in (out / "scores.jsonl").read_text().splitlines()]
        assert len(recs) == 1 and recs[0]["annotator"] == "ann" and recs[0]["circles"] == []
        # the images a record needs are in the folder, and train_reward's reader accepts it
        src = fd.open_split(out, "all", validate="full")
        assert len(src) == 1 and src[0]["fused"].shape == (64, 64, 3)


def test_concurrent_submits_from_two_servers_and_resume(inputs, tmp_path):
    """Two server processes' worth of state (two Apps, one folder), 8 threads each, 96 submits
    of ids and circles that identify them: every one is in the log, whole, and scores.jsonl has the
    latest record of each image, which train_reward's reader accepts."""
    out = tmp_path / "fb"
    apps = [an.build_app(inputs["ir"], inputs["vi"], inputs["fused"], out) for _ in range(2)]
    errors = []
    with _serving(apps[0]) as b0, _serving(apps[1]) as b1:
        ids = [it["id"] for it in _req(b0, "/api/items?who=x")[1]["items"]]

        def worker(base, t):
            for k in range(6):
                iid = ids[(t + k) % len(ids)]
                body = {"id": iid, "who": f"w{t}", "scores": GOOD,
                        "circles": [{"x": t, "y": k, "r": 1 + t}] * 20}
                st, res = _req(base, "/api/submit", body)
                if st != 200:
                    errors.append((st, res))

        threads = [threading.Thread(target=worker, args=(b, t))
                   for t, b in enumerate([b0, b1] * 8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors[:3]
    log = [json.loads(x) for x in (out / an.ANNOTATIONS_LOG).read_text().splitlines()]
    assert len(log) == 96
    for r in log:  # each record whole: its circles belong to its annotator
        t = int(r["annotator"][1:])
        assert len(r["circles"]) == 20 and all(c["x"] == t and c["r"] == 1 + t for c in r["circles"])
    latest = {r["fused"]: r for r in log}
    lines = [json.loads(x) for x in (out / "scores.jsonl").read_text().splitlines()]
    assert len(lines) == 9 and {r["fused"]: r for r in lines} == latest
    assert len(fd.open_split(out, "all")) == 9
    # A restart resumes: everything is done for anyone; a torn last line (a crash) is ignored
    with open(out / an.ANNOTATIONS_LOG, "ab") as f:
        f.write(b'{"fused": "mean/00000.png", "scor')
    app = an.build_app(inputs["ir"], inputs["vi"], inputs["fused"], out)
    assert app.api_items({"who": "new"})["done"] == 9
    with _serving(app) as base:
        st, _ = _req(base, "/api/submit", {"id": ids[0], "who": "new", "scores": GOOD})
        assert st == 200
    log2 = an.read_log(out / an.ANNOTATIONS_LOG)
    assert len(log2) == 97 and log2[-1]["annotator"] == "new"
    assert len(fd.open_split(out, "all")) == 9


def test_cli_prints_its_address_and_serves_the_page(inputs, tmp_path):
    import re
    import subprocess
    import sys
    out = tmp_path / "fb"
    cmd = [sys.executable, "-m", "evafusion_jax.annotate", "--ir", str(inputs["ir"]),
           "--vi", str(inputs["vi"]), "--fused", f"mean={inputs['fused']['mean']}",
           "--fused", f"max={inputs['fused']['max']}", "--out", str(out), "--rank"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=str(REPO), env=dict(os.environ, JAX_PLATFORMS="cpu"))
    try:
        text = proc.stdout.readline() + proc.stdout.readline()
        m = re.search(r"http://127\.0\.0\.1:(\d+)/", text)
        assert m, (text, proc.poll() is not None and proc.stderr.read())
        base = m.group(0).rstrip("/")
        assert _req(base, "/api/config")[1] == {"mode": "rank", "count": 3,
                                                "score_names": list(fd.DATASET_SCORE_NAMES)}
        with urllib.request.urlopen(base + "/", timeout=30) as r:  # the page (package data)
            assert '<script src="/annotate.js">' in r.read().decode()
        with urllib.request.urlopen(base + "/annotate.js", timeout=30) as r:
            assert r.headers["Content-Type"].startswith("text/javascript")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    # inputs are checked before anything is written
    bad = ["--ir", str(inputs["ir"]), "--vi", str(inputs["vi"]), "--out", str(tmp_path / "b")]
    assert an.main(bad + ["--fused", "no-equals-sign"]) == 2
    assert an.main(bad + ["--fused", f"a/b={inputs['fused']['mean']}"]) == 2
    assert an.main(bad + ["--fused", f"x={tmp_path / 'missing'}"]) == 2
    assert an.main(bad + ["--fused", f"x={inputs['fused']['mean']}", "--rank"]) == 2
    assert an.main(["--ir", str(inputs["ir"]), "--vi", str(inputs["vi"]), "--fused",
                    f"x={inputs['fused']['mean']}", "--out", str(inputs["ir"] / "fb")]) == 2
    assert not (tmp_path / "b").exists() and not (inputs["ir"] / "fb").exists()
    # a feedback folder made by something else is not taken over (its scores.jsonl would go)
    other = tmp_path / "other"
    other.mkdir()
    (other / "scores.jsonl").write_text('{"fused": "a.png"}\n')
    assert an.main(bad[:4] + ["--out", str(other), "--fused", f"x={inputs['fused']['mean']}"]) == 2
    assert [p.name for p in other.iterdir()] == ["scores.jsonl"]


def test_heatmap_to_circles():
    heat = np.zeros((16, 16), np.float32)
    heat[2:6, 2:6] = 1.0      # 4x4 blob at rows/cols 2..5
    heat[12, 12] = 1.0        # one pixel: below min_area at the same size
    circles = an.heatmap_to_circles(heat, 16, 16, threshold=0.5, min_area=4)
    assert circles == [{"x": 3.5, "y": 3.5, "r": round(np.sqrt(16 / np.pi), 1)}]
    # at twice the size the heatmap is resized to the image first: centre and radius double
    big = an.heatmap_to_circles(heat, 32, 32, threshold=0.5, min_area=4)
    assert abs(big[0]["x"] - 7.5) < 1 and abs(big[0]["r"] - 2 * circles[0]["r"]) < 1


def test_review_prefills_model_annotations_and_records_changes(inputs, tmp_path):
    import jax

    from evafusion_jax.models import reward_model as rm
    from evafusion_jax.storage import checkpoints
    cfg = rm.RewardConfig.tiny()
    ck = checkpoints.save_params(tmp_path / "reward", rm.init_params(cfg, jax.random.PRNGKey(0)),
                                 cfg.to_dict(), "reward")
    one = {"mean": inputs["fused"]["mean"]}
    out = tmp_path / "fb"
    app = an.build_app(inputs["ir"], inputs["vi"], one, out, review=str(ck), threshold=0.0)
    assert (out / "predictions" / "mean" / "scores.csv").exists()
    iid = app.api_items({"who": "exp"})["items"][0]["id"]
    item = app.api_item({"id": iid, "who": "exp"})
    pred = app.predictions[app.items[iid].rel]
    assert item["prefilled"] and item["scores"] == an._prefill_scores(pred["scores"])
    assert all(isinstance(v, int) and 1 <= v <= 5 for v in item["scores"].values())
    assert item["circles"] == pred["circles"] and len(pred["circles"]) >= 1  # threshold 0
    changed = dict(item["scores"], Sharpness=item["scores"]["Sharpness"] % 5 + 1)
    app.api_submit({"id": iid, "who": "exp", "scores": changed, "circles": item["circles"]})
    rec = json.loads((out / "scores.jsonl").read_text())
    assert rec["review"]["changed"] == ["Sharpness"]
    assert rec["review"]["predicted"]["scores"] == pred["scores"]
    app.api_submit({"id": iid, "who": "exp", "scores": item["scores"], "circles": []})
    rec = json.loads((out / "scores.jsonl").read_text())
    assert rec["review"]["changed"] == ["circles"]
    # the predictions are reused after a restart (no rescoring: the files stay as they are)
    mtime = (out / "predictions" / "mean" / "scores.csv").stat().st_mtime_ns
    app2 = an.build_app(inputs["ir"], inputs["vi"], one, out, review=str(ck), threshold=0.0)
    assert (out / "predictions" / "mean" / "scores.csv").stat().st_mtime_ns == mtime
    assert app2.api_item({"id": iid, "who": "exp"})["saved"]


def test_kendalls_w_and_rank_report(tmp_path, capsys):
    # textbook values: perfect agreement 1, two opposite raters 0
    assert an.kendalls_w(np.array([[1, 2, 3], [1, 2, 3], [1, 2, 3]])) == pytest.approx(1.0)
    assert an.kendalls_w(np.array([[1, 2, 3], [3, 2, 1]])) == pytest.approx(0.0)
    # 3 raters, 4 objects: rank sums 4, 7, 9, 10 around their mean 7.5
    r = np.array([[1, 2, 3, 4], [2, 1, 4, 3], [1, 4, 2, 3]])
    sums = np.array([4, 7, 9, 10])
    assert an.kendalls_w(r) == pytest.approx(12 * ((sums - 7.5) ** 2).sum() / (9 * 60))
    fb = tmp_path / "study"
    fb.mkdir()
    recs = []
    for who in ("p1", "p2", "p3"):
        for k in range(6):
            ranking = ["A", "B", "C"] if (who, k) != ("p3", 0) else ["B", "A", "C"]
            recs.append({"pair": f"{k:03d}", "ranking": ranking, "participant": who})
    recs.append({"pair": "000", "ranking": ["C", "B", "A"], "participant": "p1"})  # superseded
    recs.append({"pair": "000", "ranking": ["A", "B", "C"], "participant": "p1"})
    (fb / an.RANKINGS_LOG).write_text("".join(json.dumps(r) + "\n" for r in recs))
    rep = an.rank_report(fb, n_boot=500)
    rows = {r["method"]: r for r in rep["methods"]}
    assert [r["method"] for r in rep["methods"]] == ["A", "B", "C"]
    assert rows["A"]["mean_rank"] == pytest.approx((17 * 1 + 2) / 18)
    assert rows["C"]["mean_rank"] == 3.0 and rows["C"]["ci_low"] == rows["C"]["ci_high"] == 3.0
    assert rows["A"]["ci_low"] <= rows["A"]["mean_rank"] <= rows["A"]["ci_high"] < rows["B"]["ci_low"]
    assert rep["rankings"] == 18 and rep["participants"] == 3 and rep["pairs"] == 6
    assert rep["kendalls_w_participants"] == pytest.approx(1.0)   # mean ranks agree in order
    # per pair: 5 pairs with W = 1, pair 000 with ranks (1,2,3),(1,2,3),(2,1,3)
    w0 = an.kendalls_w(np.array([[1, 2, 3], [1, 2, 3], [2, 1, 3]]))
    assert rep["kendalls_w_per_pair"] == pytest.approx((5 + w0) / 6)
    assert an.main(["--report", str(fb), "--bootstrap", "200"]) == 0
    text = capsys.readouterr().out
    assert "| A | 1.056 |" in text and "Kendall's W" in text
    assert (fb / "rank_report.png").stat().st_size > 1000
    assert json.loads((fb / "rank_report.json").read_text())["participants"] == 3
    assert an.main(["--report", str(tmp_path / "none")]) == 2


# --------------------------------------------------------------------------------------------
# The page in a real browser
# --------------------------------------------------------------------------------------------

def _browser(tmp_path):
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip(f"{CHROMIUM} / {CHROMEDRIVER} missing: apt-get install chromium chromium-driver "
                    "(.ci/run installs them)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common import selenium_manager

    def no_downloads(*a, **k):
        raise AssertionError("Selenium Manager must not run (it would download a driver)")

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
              "--disable-component-update", "--disable-sync", "--no-first-run",
              "--disable-dev-shm-usage", "--window-size=1400,660",
              f"--user-data-dir={tmp_path / 'chrome-profile'}"):
        opts.add_argument(a)
    orig = selenium_manager.SeleniumManager.binary_paths
    selenium_manager.SeleniumManager.binary_paths = no_downloads
    try:
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    finally:
        selenium_manager.SeleniumManager.binary_paths = orig
    driver.set_page_load_timeout(60)
    return driver


def _wait(driver, cond, what, timeout=60):
    from selenium.webdriver.support.ui import WebDriverWait
    return WebDriverWait(driver, timeout).until(lambda d: cond(d), message=what)


def _circles(driver):
    return [{k: float(c.get_attribute(a)) for k, a in (("x", "cx"), ("y", "cy"), ("r", "r"))}
            for c in driver.find_elements("css selector", "svg circle.art")]


def _drag(driver, view, start, end):
    """Drags on ``view`` between two points given in pixels of the image it shows (the image's
    on-screen box, zoom included, comes from the browser)."""
    from selenium.webdriver.common.action_chains import ActionChains
    img = view.find_element("tag name", "img")
    box = "return arguments[0].getBoundingClientRect().toJSON()"  # transforms included
    ir, vr = driver.execute_script(box, img), driver.execute_script(box, view)
    s = ir["width"] / float(img.get_attribute("naturalWidth"))

    def offset(p):  # from the view's centre, whole CSS pixels
        return (round(ir["x"] - vr["x"] + p[0] * s - vr["width"] / 2),
                round(ir["y"] - vr["y"] + p[1] * s - vr["height"] / 2))

    mid = ((start[0] + end[0]) / 2, (start[1] + end[1]) / 2)
    (ActionChains(driver).move_to_element_with_offset(view, *offset(start)).click_and_hold()
     .move_to_element_with_offset(view, *offset(mid)).move_to_element_with_offset(view, *offset(end))
     .release().perform())


@pytest.mark.slow
def test_browser_annotate_rank_then_train_reward(tmp_path):
    inputs = _inputs(tmp_path / "in128", size=128)  # larger images for the README screenshot
    out = tmp_path / "fb"
    app = an.build_app(inputs["ir"], inputs["vi"], inputs["fused"], out)
    driver = _browser(tmp_path)
    from selenium.webdriver.common.keys import Keys
    try:
        with _serving(app) as base:
            driver.get(base + "/?who=alice")
            _wait(driver, lambda d: d.find_element("tag name", "body").get_attribute("data-loaded"),
                  "the first image loads")
            first = driver.find_element("tag name", "body").get_attribute("data-loaded")
            assert driver.find_element("id", "pos").text == "1 / 9"
            body = driver.find_element("tag name", "body")
            # score with the keyboard: 1-5 sets the highlighted criterion and moves on
            body.send_keys("4", "3", "5", "2")
            driver.find_element("css selector", 'input[name="score-4"][value="4"]').click()
            # zoom (keys) acts on the three views together; "0" fits them again
            stages = driver.find_elements("css selector", ".stage")
            fit = [st.get_attribute("style") for st in stages]
            body.send_keys("+", "+")
            zoomed = [st.get_attribute("style") for st in stages]
            assert zoomed != fit and len({z.split("scale(")[1] for z in zoomed}) == 1
            body.send_keys("0")
            assert [st.get_attribute("style") for st in stages] == fit
            # draw a circle on the fused image, then resize it with its handle
            view = driver.find_element("css selector", '.view[data-kind="fused"]')
            _drag(driver, view, (40, 48), (56, 48))
            (c,) = _circles(driver)
            assert abs(c["x"] - 40) < 1 and abs(c["y"] - 48) < 1 and abs(c["r"] - 16) < 1
            _drag(driver, view, (c["x"] + c["r"], c["y"]), (c["x"] + c["r"] + 8, c["y"]))
            (c2,) = _circles(driver)
            assert abs(c2["r"] - 24) < 1 and abs(c2["x"] - c["x"]) < 0.01
            # a second circle, moved, then taken back by two undos
            _drag(driver, view, (100, 100), (108, 100))
            _drag(driver, view, (100, 100), (90, 95))
            c_moved = _circles(driver)[1]
            assert abs(c_moved["x"] - 90) < 1 and abs(c_moved["y"] - 95) < 1
            body.send_keys("z", "z")
            assert len(_circles(driver)) == 1
            driver.save_screenshot(str(tmp_path / "shot.png"))
            driver.find_element("id", "submit").click()
            _wait(driver, lambda d: d.find_element("id", "status").get_attribute("data-state")
                  == "saved", "saved")
            assert driver.find_element("id", "progress").text == "1 / 9 done"
            rec = json.loads((out / "scores.jsonl").read_text())
            assert rec["scores"] == {"Thermal Retention": 4, "Texture Preservation": 3,
                                     "Artifacts": 5, "Sharpness": 2, "Overall Score": 4}
            assert rec["annotator"] == "alice" and len(rec["circles"]) == 1
            assert abs(rec["circles"][0]["r"] - 24) < 1
            # the page moved on to the next image; annotate it with the keyboard only
            _wait(driver, lambda d: d.find_element("tag name", "body").get_attribute("data-loaded")
                  != first, "the next image")
            body.send_keys("3", "3", "3", "3", "3", Keys.ENTER)
            _wait(driver, lambda d: d.find_element("id", "progress").text == "2 / 9 done", "2 saved")
            # reload at the first image: what was saved is shown again
            driver.execute_script("history.replaceState(null, '', '#i=1')")
            driver.refresh()
            _wait(driver, lambda d: d.find_element("tag name", "body").get_attribute("data-loaded")
                  == first, "reload of the first image")
            assert driver.find_element("id", "status").get_attribute("data-state") == "saved"
            checked = [int(e.get_attribute("value")) for e in
                       driver.find_elements("css selector", "#scores input:checked")]
            assert checked == [4, 3, 5, 2, 4]
            (c3,) = _circles(driver)
            assert abs(c3["r"] - c2["r"]) < 0.11 and abs(c3["x"] - c2["x"]) < 0.11
            # Next shows the second image with its keyboard-only scores
            driver.find_element("id", "next").click()
            _wait(driver, lambda d: d.find_element("id", "pos").text == "2 / 9", "next image")
            _wait(driver, lambda d: len(d.find_elements("css selector", "#scores input:checked"))
                  == 5, "its scores")
            assert {e.get_attribute("value") for e in
                    driver.find_elements("css selector", "#scores input:checked")} == {"3"}
            assert _circles(driver) == []
            # a restarted server (new App on the same folder) resumes at the third image
        app2 = an.build_app(inputs["ir"], inputs["vi"], inputs["fused"], out)
        with _serving(app2) as base:
            driver.get(base + "/?who=alice")
            _wait(driver, lambda d: d.find_element("id", "pos").text == "3 / 9", "resume at 3")
            assert driver.find_element("id", "progress").text == "2 / 9 done"
        # blind ranking of the three methods
        rank_out = tmp_path / "study"
        rapp = an.build_app(inputs["ir"], inputs["vi"], inputs["fused"], rank_out, rank=True)
        with _serving(rapp) as base:
            driver.get(base + "/?who=bob")
            _wait(driver, lambda d: d.find_element("tag name", "body").get_attribute("data-loaded"),
                  "the first pair loads")
            page = driver.page_source
            assert not any(m in page for m in ("mean", "noisy", ">max"))
            cands = driver.find_elements("css selector", '.view[data-kind="cand"]')
            assert len(cands) == 3
            cands[2].click()                                  # C best, then keys: A, then B
            driver.find_element("tag name", "body").send_keys("a", "b")
            assert driver.find_element("id", "order").text == "C > A > B"
            driver.find_element("id", "submit").click()
            _wait(driver, lambda d: d.find_element("id", "progress").text == "1 / 3 done",
                  "ranking saved")
        (r,) = an.read_log(rank_out / an.RANKINGS_LOG)
        shown = r["shown"]  # the methods behind A, B, C for bob on this pair
        assert r["ranking"] == [shown[2], shown[0], shown[1]] and r["participant"] == "bob"
        rep = an.rank_report(rank_out, n_boot=50)
        assert {m["method"]: m["mean_rank"] for m in rep["methods"]} == {
            shown[2]: 1.0, shown[0]: 2.0, shown[1]: 3.0}
    finally:
        driver.quit()
    # the README's screenshot: kept small (RGB PNG at half size)
    img = Image.open(tmp_path / "shot.png").convert("RGB")
    img = img.resize((img.width * 3 // 4, img.height * 3 // 4), Image.LANCZOS)
    img.quantize(colors=128).save(tmp_path / "small.png", optimize=True)
    if os.environ.get("EVAFUSION_UPDATE_SCREENSHOT"):
        SCREENSHOT.parent.mkdir(exist_ok=True)
        shutil.copy(tmp_path / "small.png", SCREENSHOT)
    assert (tmp_path / "small.png").stat().st_size < 300_000

    # train_reward reads the folder the page wrote and trains a few steps
    from evafusion_jax import train_reward as tr
    w = tmp_path / "run"
    args = ["prog", f"--config={REPO / 'configs' / 'reward.py'}", "--config.model.preset=tiny",
            f"--config.data.path={out}", f"--config.workdir={w}", "--config.data.train_split=all",
            "--config.data.eval_split=", "--config.batch_size=2", "--config.num_epochs=3",
            "--config.progress=False", "--config.cache.enabled=False"]
    assert tr.main(args) == 0
    summary = json.loads((w / "summary.json").read_text())
    assert summary["step"] == 3
    assert (w / "final_model" / "config.json").exists()
