"""Bad requests get honest errors: the right status and an OpenAI-style error naming the
field; the API key guards every route but /health; bodies over the limit get 413."""

from __future__ import annotations

import base64

import pytest

LONG = "the quiet sea " * 60  # well over the 128-token context

BAD = [
    # (route, body, status, param, code)
    ("/v1/completions", {"prompt": "x", "max_tokens": "5"}, 400, "max_tokens", "int_type"),
    ("/v1/completions", {"prompt": "x", "max_tokens": -1}, 400, "max_tokens", None),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens", "invalid_value"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, 400, "top_p", None),
    ("/v1/completions", {"prompt": "x", "top_p": 1.5}, 400, "top_p", None),
    ("/v1/completions", {"prompt": "x", "temperature": -0.1}, 400, "temperature", None),
    ("/v1/completions", {"prompt": "x", "n": 0}, 400, "n", None),
    ("/v1/completions", {"prompt": "x", "stream": "yes"}, 400, "stream", None),
    ("/v1/completions", {"prompt": "x", "best_of": 2}, 400, "best_of", "extra_forbidden"),
    ("/v1/completions", {"prompt": "x", "stream_options": {"include_usage": True}}, 400,
     "stream_options", "invalid_value"),
    ("/v1/completions", {"prompt": LONG}, 400, "prompt", "context_length_exceeded"),
    ("/v1/completions", {"prompt": []}, 400, "prompt", "empty_prompt"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt", "empty_prompt"),
    ("/v1/completions", {"prompt": [[1, 2], []]}, 400, "prompt", "empty_prompt"),
    ("/v1/completions", {"prompt": [1, "a"]}, 400, "prompt", "invalid_type"),
    ("/v1/completions", {"prompt": [5, 99999]}, 400, "prompt", "invalid_token_id"),
    ("/v1/completions", {"prompt": [-1]}, 400, "prompt", "invalid_type"),
    ("/v1/completions", {"max_tokens": 3}, 400, "prompt", "missing"),
    ("/v1/completions", {"prompt": "x", "model": "nope"}, 404, "model", "model_not_found"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages", None),
    ("/v1/chat/completions", {"messages": [{"role": "bot", "content": "x"}]}, 400,
     "messages", "literal_error"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": LONG}]}, 400,
     "messages", "context_length_exceeded"),
    ("/api", {"prompts": []}, 400, "prompts", None),
    ("/api", {"prompts": ["x"], "tokens_to_generate": 0}, 400, "tokens_to_generate",
     "invalid_value"),
    ("/api", {"prompts": ["x"], "top_k": 5, "top_p": 0.5}, 400, "top_p", "invalid_value"),
    ("/api", {"prompts": ["x"], "temperature": 0}, 400, "temperature", None),
    ("/api", {"prompts": ["x"], "stop_on_eol": True}, 400, "stop_on_eol", "extra_forbidden"),
    ("/tokenize", {"text": "x"}, 400, "prompt", "missing"),
]


def _request(client, route, body):
    method = client.put if route == "/api" else client.post
    return method(route, json=body)


@pytest.mark.parametrize("route,body,status,param,code", BAD)
def test_bad_request_table(client, route, body, status, param, code):
    r = _request(client, route, body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and error["message"]
    if code is not None:
        assert error["code"] == code


def test_context_overflow_names_the_token_counts(client):
    error = client.post("/v1/completions", json={"prompt": LONG, "max_tokens": 10}).json()
    assert "128" in error["error"]["message"] and "10 to generate" in error["error"]["message"]


def test_invalid_json_and_non_object_bodies(client):
    r = client.post("/v1/completions", content=b'{"prompt": ',
                    headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = client.post("/v1/completions", json=["x"])
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_body"


def test_unknown_route_and_method(client):
    assert client.get("/v1/nothing").json()["error"]["type"] == "not_found_error"
    r = client.get("/v1/completions")
    assert r.status_code == 405 and "error" in r.json()


@pytest.fixture(scope="module")
def guarded(make_server):
    with make_server(api_key="s3cret", max_body_bytes=2000) as live:
        yield live


@pytest.mark.parametrize("path,method", [("/v1/models", "GET"), ("/v1/completions", "POST"),
                                         ("/metrics", "GET"), ("/", "GET"),
                                         ("/tokenizer_info", "GET"), ("/api", "PUT")])
def test_api_key_guards_every_route_but_health(guarded, path, method):
    with guarded.client() as c:
        body = {"prompt": "x", "max_tokens": 1} if method == "POST" else None
        body = {"prompts": ["x"], "tokens_to_generate": 1} if method == "PUT" else body
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            r = c.request(method, path, json=body, headers=headers)
            assert r.status_code == 401, (headers, r.text)
            assert r.json()["error"]["code"] == "invalid_api_key"
        r = c.request(method, path, json=body, headers={"Authorization": "Bearer s3cret"})
        assert r.status_code == 200, r.text
        basic = base64.b64encode(b"me:s3cret").decode()
        r = c.request(method, path, json=body, headers={"Authorization": f"Basic {basic}"})
        assert r.status_code == 200, r.text
        assert c.get("/health").status_code == 200


def test_body_too_large(guarded):
    auth = {"Authorization": "Bearer s3cret"}
    with guarded.client(headers=auth) as c:
        r = c.post("/v1/completions", json={"prompt": "x" * 5000})
        assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"

        def chunks():  # no Content-Length: the limit is enforced on the bytes received
            yield b'{"prompt": "'
            for _ in range(10):
                yield b"x" * 500
            yield b'"}'

        r = c.post("/v1/completions", content=chunks(),
                   headers={"content-type": "application/json"})
        assert r.status_code == 413 and "2000 bytes" in r.json()["error"]["message"]
        assert c.post("/v1/completions", json={"prompt": "x", "max_tokens": 1}).status_code == 200
