"""Remote reads (`ray_hrc.remote`) against the local S3 server (moto), directly and through a fault-injecting proxy."""

from __future__ import annotations

import time

import numpy as np
import pytest
import s3fs
from rawfits import write_file

from bench.s3proxy import CountingProxy
from ray_hrc.chips import Chip, ChipError, map_fits, read_fits
from ray_hrc.remote import FetchConfig, fetch, read_remote

FAST_RETRY = FetchConfig(attempts=4, backoff_s=0.01, connect_timeout_s=1.0, read_timeout_s=1.0)


@pytest.fixture(scope="module")
def local_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("remote")
    return {
        "raw": write_file(root / "jraw0001q_raw.fits", "ACS/WFC", "raw", rootname="jraw0001q"),
        "flt": write_file(root / "iflt0001q_flt.fits", "WFC3/UVIS", "calibrated", rootname="iflt0001q"),
    }


@pytest.fixture(scope="module")
def bucket_files(s3_server, local_files):
    """The local files in a bucket of their own, uploaded once for the module: ({kind: URI}, storage options)."""
    import boto3

    endpoint = s3_server["client_kwargs"]["endpoint_url"]
    boto3.client(
        "s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing", aws_secret_access_key="testing"
    ).create_bucket(Bucket="remote-tests")
    fs = s3fs.S3FileSystem(**s3_server)
    uris = {}
    for kind, path in local_files.items():
        uris[kind] = f"s3://remote-tests/{path.name}"
        fs.put_file(str(path), uris[kind])
    yield uris, s3_server
    fs.rm("remote-tests", recursive=True)


def _proxied(opts: dict, proxy: CountingProxy) -> dict:
    return {**opts, "client_kwargs": {**opts["client_kwargs"], "endpoint_url": proxy.endpoint}}


def _assert_same_chips(remote: list, local: list) -> None:
    assert [type(r) for r in remote] == [Chip] * len(local) and all(isinstance(c, Chip) for c in local)
    for r, c in zip(remote, local, strict=True):
        assert r.pixels.dtype == c.pixels.dtype and np.array_equal(r.pixels, c.pixels)
        assert np.array_equal(r.amp_bias, c.amp_bias)
        assert (r.meta.hdu, r.meta.extver, r.meta.obsid, r.meta.ra, r.meta.dec) == (
            c.meta.hdu,
            c.meta.extver,
            c.meta.obsid,
            c.meta.ra,
            c.meta.dec,
        )


@pytest.mark.parametrize("mode", ["whole", "ranges"])
def test_remote_chips_are_byte_exact_and_cost_few_requests(bucket_files, local_files, s3_server, mode):
    uris, opts = bucket_files
    endpoint = opts["client_kwargs"]["endpoint_url"]
    with CountingProxy(endpoint) as proxy:
        for kind in ("raw", "flt"):
            proxy.reset_counts()
            remote = read_remote(uris[kind], storage_options=_proxied(opts, proxy), config=FetchConfig(mode=mode))
            _assert_same_chips(remote, read_fits(str(local_files[kind])))
            fetched = sum(n for *_, n in proxy.requests)
            size = local_files[kind].stat().st_size
            if mode == "whole":
                assert len(proxy.requests) == 1 and fetched == size  # one GET, no HEAD
            else:
                assert len(proxy.requests) == 4  # HEAD, first headers, SCI,1 (+ next headers), SCI,2 (+ the rest)
                _, scis = map_fits(str(local_files[kind]))
                assert fetched >= sum(sci.section.nbytes for _, sci in scis)  # the floor: each SCI extension once


def test_range_reads_skip_the_data_of_other_extensions(s3_bucket, tmp_path):
    from astropy.io import fits

    bucket, opts = s3_bucket
    path = tmp_path / "small_flt.fits"
    sci = fits.ImageHDU(np.arange(100 * 200, dtype=np.float32).reshape(100, 200), name="SCI", ver=1)
    err = fits.ImageHDU(np.ones((1000, 1000), np.float32), name="ERR", ver=1)  # 4 MB that a chip does not need
    fits.HDUList([fits.PrimaryHDU(), sci, err, fits.ImageHDU(np.zeros((10, 10), np.int16), name="DQ", ver=1)]).writeto(path)
    s3fs.S3FileSystem(**opts).put_file(str(path), f"{bucket}/{path.name}")
    with CountingProxy(opts["client_kwargs"]["endpoint_url"]) as proxy:
        data = fetch(f"{bucket}/{path.name}", _proxied(opts, proxy), FetchConfig(mode="ranges"))
        fetched = sum(n for *_, n in proxy.requests)
    assert len(data) == path.stat().st_size and fetched < 400_000  # SCI data and headers, each with 64 KiB of read-ahead
    primary, scis = map_fits(memoryview(data))
    assert [i for i, _ in scis] == [1] and np.array_equal(scis[0][1].section, sci.data)


def test_read_fits_of_an_s3_uri_takes_the_remote_path(bucket_files, local_files):
    uris, opts = bucket_files
    chips = read_fits(uris["raw"], hdus=[4], storage_options=opts)
    _assert_same_chips(chips, read_fits(str(local_files["raw"]), hdus=[4]))


@pytest.mark.parametrize("faults", [["503", "503", "503"], ["reset", "cut"]])
def test_transient_faults_are_retried_to_the_same_chips(bucket_files, local_files, faults):
    uris, opts = bucket_files
    with CountingProxy(opts["client_kwargs"]["endpoint_url"]) as proxy:
        proxy.fail(uris["raw"].split("://", 1)[1], faults)
        remote = read_remote(uris["raw"], storage_options=_proxied(opts, proxy), config=FAST_RETRY)
        assert len(proxy.requests) == len(faults) + 1
    _assert_same_chips(remote, read_fits(str(local_files["raw"])))


def test_too_many_faults_give_an_unreadable_row_naming_the_uri_and_the_error(bucket_files):
    uris, opts = bucket_files
    with CountingProxy(opts["client_kwargs"]["endpoint_url"]) as proxy:
        proxy.fail(uris["raw"].split("://", 1)[1], ["503"] * 10)
        (error,) = read_remote(uris["raw"], storage_options=_proxied(opts, proxy), config=FAST_RETRY)
        assert len(proxy.requests) == FAST_RETRY.attempts
    assert isinstance(error, ChipError) and error.error_class == "unreadable"
    assert uris["raw"] in error.message and "4 attempt" in error.message and "reduce your request rate" in error.message


def test_a_server_that_never_answers_gives_an_error_row_in_bounded_time(bucket_files):
    uris, opts = bucket_files
    config = FetchConfig(attempts=2, backoff_s=0.01, connect_timeout_s=0.5, read_timeout_s=0.5)
    with CountingProxy(opts["client_kwargs"]["endpoint_url"]) as proxy:
        proxy.fail(uris["raw"].split("://", 1)[1], ["hang"] * 10)
        t0 = time.monotonic()
        records = read_remote(uris["raw"], hdus=[1, 4], storage_options=_proxied(opts, proxy), config=config)
        took = time.monotonic() - t0
    assert [(r.hdu, r.error_class) for r in records] == [(1, "unreadable"), (4, "unreadable")]
    assert "2 attempt" in records[0].message and "imeout" in records[0].message
    assert took < 10, f"took {took:.1f} s"


def test_missing_and_too_large_objects_are_not_retried(bucket_files):
    uris, opts = bucket_files
    with CountingProxy(opts["client_kwargs"]["endpoint_url"]) as proxy:
        (missing,) = read_remote(uris["raw"] + ".nope", storage_options=_proxied(opts, proxy), config=FAST_RETRY)
        assert len(proxy.requests) == 1
        proxy.reset_counts()
        (large,) = read_remote(uris["raw"], storage_options=_proxied(opts, proxy), config=FetchConfig(max_object_bytes=10 * 2880))
        assert len(proxy.requests) == 1 and proxy.requests[0][3] == 10 * 2880 + 1  # no more than the cap + 1 fetched
    assert missing.error_class == "unreadable" and "no such object" in missing.message and uris["raw"] in missing.message
    assert large.error_class == "unreadable" and "max_object_bytes" in large.message


def test_truncated_remote_file_gives_the_same_records_as_local(s3_bucket, local_files, tmp_path):
    bucket, opts = s3_bucket
    cut = tmp_path / "jcut0001q_raw.fits"
    cut.write_bytes(local_files["raw"].read_bytes()[: 2880 * 2000])
    s3fs.S3FileSystem(**opts).put_file(str(cut), f"{bucket}/{cut.name}")
    remote = read_remote(f"{bucket}/{cut.name}", storage_options=opts)
    local = read_fits(str(cut))
    assert [(r.hdu, r.error_class) for r in remote] == [(c.hdu, c.error_class) for c in local]
    assert {r.error_class for r in remote} == {"truncated"}


def test_chip_rows_takes_the_read_configs_fetch_options(bucket_files):
    from ray_hrc.data import ReadConfig, chip_rows

    uris, opts = bucket_files
    config = ReadConfig(storage_options=opts, fetch={"max_object_bytes": 10 * 2880})
    rows = chip_rows({"uri": uris["raw"], "hdus": [1, 4]}, config.storage_options, fetch=config.fetch)
    assert [(r["hdu"], r["error_class"]) for r in rows] == [(1, "unreadable"), (4, "unreadable")]
    assert "max_object_bytes=28800" in rows[0]["error"]
    good = chip_rows({"uri": uris["raw"], "hdus": [1, 4]}, config.storage_options)
    assert [(r["hdu"], r["error_class"]) for r in good] == [(1, ""), (4, "")]


def test_https_sources_take_the_same_path_and_4xx_is_not_retried(bucket_files, local_files, s3_server):
    import boto3

    uris, opts = bucket_files
    endpoint = opts["client_kwargs"]["endpoint_url"]
    bucket, key = uris["raw"][len("s3://") :].split("/", 1)
    url = f"{endpoint}/{bucket}/{key}"
    with CountingProxy(endpoint) as proxy:
        proxied = f"{proxy.endpoint}/{bucket}/{key}"
        (forbidden,) = read_remote(proxied, config=FAST_RETRY)  # moto refuses an unsigned GET of a private object
        assert len(proxy.requests) == 1 and forbidden.error_class == "unreadable" and "403" in forbidden.message
    client = boto3.client(
        "s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing", aws_secret_access_key="testing"
    )
    client.put_object_acl(Bucket=bucket, Key=key, ACL="public-read")
    _assert_same_chips(read_fits(url), read_fits(str(local_files["raw"])))
