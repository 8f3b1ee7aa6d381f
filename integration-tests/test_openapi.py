"""The OpenAPI document: valid per the OpenAPI spec, covering every route the server serves,
and Swagger UI served at /docs."""
import requests
from openapi_spec_validator import validate

ROUTES = {
    "/": {"get", "post"},
    "/generate": {"post"},
    "/generate_stream": {"post"},
    "/v1/chat/completions": {"post"},
    "/v1/completions": {"post"},
    "/v1/models": {"get"},
    "/tokenize": {"post"},
    "/chat_tokenize": {"post"},
    "/invocations": {"post"},
    "/health": {"get"},
    "/ping": {"get"},
    "/info": {"get"},
    "/metrics": {"get"},
}


def test_openapi_document_is_valid_and_complete(smollm2):
    spec = requests.get(smollm2.url + "/api-doc/openapi.json").json()
    validate(spec)
    paths = {p: set(ops) for p, ops in spec["paths"].items()}
    assert paths == ROUTES
    # Every documented route answers (anything but 404/405).
    for path, methods in ROUTES.items():
        for method in methods:
            r = requests.request(method, smollm2.url + path, json={})
            assert r.status_code not in (404, 405), (method, path, r.status_code)
    schemas = spec["components"]["schemas"]
    for name in ["GenerateParameters", "GenerateResponse", "ChatRequest", "ChatCompletion", "ChatCompletionChunk",
                 "CompletionRequest", "Completion", "StreamResponse", "ErrorResponse", "Info"]:
        assert name in schemas, name


def test_swagger_ui(smollm2):
    r = requests.get(smollm2.url + "/docs/")
    assert r.status_code == 200 and "swagger" in r.text.lower()
