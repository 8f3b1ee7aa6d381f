"""`/metrics` with TGI's metric names, counted once per request (TGI double-counts chat)."""
import re

import pytest
import requests

from conftest import TINY, start


@pytest.fixture(scope="module")
def server():
    s = start(TINY / "tiny-llama", "--dtype", "float32", "--api-key", "k")
    yield s
    assert s.stop() == 0


def value(text, name, labels=""):
    m = re.search(rf"^{re.escape(name)}{re.escape(labels)} ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def test_request_metrics(server):
    auth = {"Authorization": "Bearer k"}
    before = requests.get(server.url + "/metrics").text  # open without the key, for scrapers
    assert value(before, "tgi_batch_max_total_tokens") > 0
    r = requests.post(server.url + "/v1/chat/completions", headers=auth,
                      json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200
    r = requests.post(server.url + "/generate", headers=auth, json={"inputs": "Hi", "parameters": {"temperature": -1}})
    assert r.status_code == 422
    after = requests.get(server.url + "/metrics").text
    assert value(after, "tgi_request_count") - value(before, "tgi_request_count") == 2
    assert value(after, "tgi_request_success") - value(before, "tgi_request_success") == 1
    assert value(after, "tgi_request_failure", '{err="validation"}') - value(before, "tgi_request_failure", '{err="validation"}') == 1
    assert value(after, "tgi_batch_inference_count", '{method="prefill"}') >= 1
    assert value(after, "tgi_batch_inference_success", '{method="decode"}') >= 2
    for name in ["tgi_request_duration_bucket", "tgi_request_queue_duration_bucket", "tgi_request_inference_duration_bucket",
                 "tgi_request_mean_time_per_token_duration_bucket", "tgi_request_input_length_bucket",
                 "tgi_request_generated_tokens_bucket", "tgi_batch_forward_duration_bucket", "tgi_batch_next_size_bucket",
                 "tgi_queue_size", "tgi_batch_current_size"]:
        assert name in after, name
    assert 'tgi_request_duration_bucket{le="0.00015"}' in after
