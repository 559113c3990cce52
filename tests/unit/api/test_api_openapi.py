"""The OpenAPI document vmmkit serves: valid, and faithful to Cloud Hypervisor's for every
endpoint it implements (same request bodies and success answers)."""

from __future__ import annotations

import pytest
from api_support import ch_document, served_document

from vmmkit.api.server import NOT_IMPLEMENTED, ROUTES


def test_the_served_document_is_valid_openapi() -> None:
    from openapi_spec_validator import validate

    validate(served_document())


def test_every_ch_path_is_implemented_or_answers_501() -> None:
    ch_paths = {path.lstrip("/") for path in ch_document()["paths"]}
    assert ch_paths <= set(ROUTES) | set(NOT_IMPLEMENTED)
    assert set(NOT_IMPLEMENTED) <= ch_paths


@pytest.mark.parametrize("endpoint", sorted(set(ROUTES) - {"openapi"}))
def test_implemented_endpoints_keep_chs_contract(endpoint: str) -> None:
    ch = ch_document()["paths"][f"/{endpoint}"]
    ours = served_document()["paths"][f"/{endpoint}"]
    assert set(ch) == set(ours) == {ROUTES[endpoint].method.lower()}
    method = ROUTES[endpoint].method.lower()
    assert ch[method].get("requestBody") == ours[method].get("requestBody")
    ch_responses = {str(code): value for code, value in ch[method]["responses"].items()}
    for code, response in ch_responses.items():
        if code.startswith("2"):
            assert ours[method]["responses"][code] == response, code


@pytest.mark.parametrize("endpoint", sorted(NOT_IMPLEMENTED))
def test_unimplemented_endpoints_document_only_errors(endpoint: str) -> None:
    (operation,) = served_document()["paths"][f"/{endpoint}"].values()
    assert set(operation["responses"]) == {"405", "501"}


def test_the_schemas_are_chs_plus_the_error_body() -> None:
    ours = dict(served_document()["components"]["schemas"])
    error = ours.pop("ErrorResponse")
    assert error["type"] == "array" and error["items"] == {"type": "string"}
    assert ours == ch_document()["components"]["schemas"]
