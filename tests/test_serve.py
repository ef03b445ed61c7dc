"""Ray Serve over real HTTP: the same probabilities as `ray-hrc classify`, bad requests answered 4xx, load."""

from __future__ import annotations

import socket
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import pytest
import requests
from rawfits import write_file

from ray_hrc.classify import ClassifyConfig, classify_archive
from ray_hrc.data import ReadConfig
from ray_hrc.manifest import read_manifest

pytestmark = pytest.mark.timeout(600)
LIMIT_MB = 40  # a raw file is ~34 MB; the test server's limit is just above it


@pytest.fixture(scope="module")
def server(ray_session, random_checkpoint):
    from ray import serve

    from ray_hrc.serve import run_server

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # half a CPU per replica leaves the session's 2 CPUs room for the batch pipeline this module compares against
    url = run_server(random_checkpoint, port=port, max_body_mb=LIMIT_MB, num_cpus=0.5, blocking=False)
    yield url
    serve.shutdown()


@pytest.fixture(scope="module")
def bad_bodies(tiny_archive, tmp_path_factory):
    good = read_manifest(str(tiny_archive))["URI"].iloc[0]
    data = open(good, "rb").read()
    d = tmp_path_factory.mktemp("bad")
    ir = write_file(d / "ir_raw.fits", instrument="WFC3", detector="IR").read_bytes()
    return {
        "empty": (b"", 400),
        "not_fits": (b"<html>not a FITS file</html>" * 100, 415),
        "truncated": (data[: len(data) // 3], 400),
        "unsupported": (ir, 422),
        "too_large": (data + b"\0" * (LIMIT_MB * 1024 * 1024 - len(data) + 1), 413),
        "a_path": (good.encode(), 415),  # a path in the body is just bytes: never opened
    }


def test_serve_equals_batch_classification(server, tiny_archive, random_checkpoint, tmp_path):
    uri = read_manifest(str(tiny_archive))["URI"].iloc[0]
    answer = requests.post(f"{server}/classify", data=open(uri, "rb").read(), timeout=120)
    assert answer.status_code == 200, answer.text
    chips = pd.DataFrame(answer.json()["chips"]).sort_values("hdu").reset_index(drop=True)
    read, model_stage = ReadConfig(num_cpus=0.5), ClassifyConfig(cpus_per_actor=0.5, max_actors=1)
    summary = classify_archive([uri], random_checkpoint, str(tmp_path / "cat"), read=read, config=model_stage)
    catalog = pd.read_parquet(summary["catalog"]).sort_values("hdu").reset_index(drop=True)
    assert chips["hdu"].tolist() == catalog["hdu"].tolist() == [1, 4]
    np.testing.assert_allclose(chips["p_galaxy"], catalog["p_galaxy"], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(chips["p_nsc"], catalog["p_nsc"], rtol=1e-6, atol=1e-7)
    assert chips["label"].tolist() == catalog["label"].tolist()
    assert chips["obsid"].tolist() == catalog["obsid"].tolist() and chips["checkpoint"][0] == catalog["checkpoint"][0]


@pytest.mark.parametrize("case", ["empty", "not_fits", "truncated", "unsupported", "too_large", "a_path"])
def test_bad_requests_get_4xx_json_and_the_service_stays_up(server, bad_bodies, case):
    body, status = bad_bodies[case]
    answer = requests.post(f"{server}/classify", data=body, timeout=120)
    assert answer.status_code == status, answer.text[:300]
    assert "error" in answer.json()
    assert requests.get(f"{server}/", timeout=30).status_code == 200


def test_hundreds_of_mixed_concurrent_requests(server, bad_bodies, tiny_archive):
    good = open(read_manifest(str(tiny_archive))["URI"].iloc[0], "rb").read()
    cases = [("good", good, 200)] * 8 + [(k, b, s) for k, (b, s) in bad_bodies.items() if k != "too_large"] * 40
    cases += [("wrong_method", None, 405)] * 20 + [("wrong_route", b"x", 404)] * 20

    def send(case):
        name, body, status = case
        if name == "wrong_method":
            return name, status, requests.get(f"{server}/classify", timeout=300)
        route = "/nowhere" if name == "wrong_route" else "/classify"
        return name, status, requests.post(f"{server}{route}", data=body, timeout=300)

    with ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(send, cases))
    assert len(results) >= 200
    for name, status, answer in results:
        assert answer.status_code == status, (name, answer.status_code, answer.text[:200])
        body = answer.json()
        assert ("chips" in body and len(body["chips"]) == 2) if status == 200 else "error" in body
