"""Tokens: obtaining, refreshing with rotation, and every way a forged or stale token is refused."""

import base64
import json
import threading
from datetime import timedelta

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from django.conf import settings
from django.db import connection
from django.utils import timezone
from rest_framework.test import APIClient
from rest_framework_simplejwt.tokens import AccessToken

from agents import services
from agents.models import Agent, IssuedToken

ME = "/api/v1/agents/me/"
OBTAIN = "/api/v1/auth/token/"
REFRESH = "/api/v1/auth/token/refresh/"

# Forging with HS512 uses the real, shorter key on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:The HMAC key is")


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims_of(token: str) -> dict:
    """Read a token's claims without checking it, as an attacker holding one would."""
    return jwt.decode(token, options={"verify_signature": False})


def signed(claims: dict, *, key=None, algorithm="HS256") -> str:
    return jwt.encode(claims, key or settings.SIMPLE_JWT["SIGNING_KEY"], algorithm=algorithm)


def get_me(token: str):
    return APIClient().get(ME, HTTP_AUTHORIZATION=f"Bearer {token}")


def assert_refused(response, code=None):
    assert response.status_code == 401, response.content
    body = response.json()
    assert isinstance(body["detail"], str) and body["detail"]
    if code:
        assert body["code"] == code
    assert response["WWW-Authenticate"].startswith("Bearer")


@pytest.fixture(scope="module")
def other_rsa_key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


# --- Obtaining ----------------------------------------------------------------------------------


def test_it_issues_a_token_pair_for_the_right_secret(api, alice):
    response = api.post(OBTAIN, {"agent_id": "alice", "agent_secret": alice.secret}, format="json")
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"access", "refresh"}
    assert get_me(body["access"]).json()["agent_id"] == "alice"
    assert claims_of(body["access"])["agent_id"] == "alice"
    assert jwt.get_unverified_header(body["access"])["alg"] == "HS256"


@pytest.mark.parametrize(
    "credentials",
    [
        {"agent_id": "alice", "agent_secret": "wrong"},
        {"agent_id": "nobody", "agent_secret": "wrong"},
    ],
)
def test_it_refuses_wrong_credentials_with_the_same_answer(api, alice, credentials):
    response = api.post(OBTAIN, credentials, format="json")
    assert response.status_code == 401
    assert response.json()["code"] == "invalid_credentials"


def test_it_names_the_missing_secret(api, alice):
    response = api.post(OBTAIN, {"agent_id": "alice"}, format="json")
    assert response.status_code == 400
    assert "agent_secret" in response.json()["errors"]


def test_it_refuses_tokens_to_a_deregistered_agent(api, alice):
    services.agent_deregister(agent=alice.agent)
    response = api.post(OBTAIN, {"agent_id": "alice", "agent_secret": alice.secret}, format="json")
    assert response.status_code == 401
    assert response.json()["code"] == "agent_deregistered"


def test_it_refuses_tokens_to_a_disabled_agent(api, alice):
    services.agent_disable(agent=alice.agent)
    response = api.post(OBTAIN, {"agent_id": "alice", "agent_secret": alice.secret}, format="json")
    assert response.status_code == 401
    assert response.json()["code"] == "agent_disabled"


def test_it_issues_operator_tokens_for_staff_credentials(api, operator):
    response = api.post(
        OBTAIN, {"username": "operator", "password": "op-password-1"}, format="json"
    )
    assert response.status_code == 200
    access = response.json()["access"]
    assert (
        APIClient().get("/api/v1/agents/", HTTP_AUTHORIZATION=f"Bearer {access}").status_code == 200
    )


def test_it_refuses_operator_tokens_to_a_user_who_is_not_staff(api, django_user_model):
    django_user_model.objects.create_user("visitor", password="pw-visitor-1")
    response = api.post(OBTAIN, {"username": "visitor", "password": "pw-visitor-1"}, format="json")
    assert response.status_code == 401


def test_it_refuses_an_operator_with_a_wrong_password(api, operator):
    response = api.post(OBTAIN, {"username": "operator", "password": "nope"}, format="json")
    assert response.status_code == 401


# --- Forged and unusable access tokens ----------------------------------------------------------


def test_a_token_re_signed_with_the_real_key_is_accepted(alice):
    # The control for the forgeries below: the helpers themselves produce a usable token.
    assert get_me(signed(claims_of(alice.access))).status_code == 200


def test_it_rejects_a_token_with_alg_none(alice):
    header = b64url(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    payload = b64url(json.dumps(claims_of(alice.access)).encode())
    assert_refused(get_me(f"{header}.{payload}."), "token_not_valid")


def test_it_rejects_a_token_signed_with_hs512_even_with_the_real_key(alice):
    token = signed(claims_of(alice.access), algorithm="HS512")
    assert_refused(get_me(token), "token_not_valid")


def test_it_rejects_a_token_signed_with_rs256_by_another_key(alice, other_rsa_key):
    token = signed(claims_of(alice.access), key=other_rsa_key, algorithm="RS256")
    assert_refused(get_me(token), "token_not_valid")


def test_it_rejects_a_token_signed_with_another_hmac_key(alice):
    token = signed(claims_of(alice.access), key="someone-else's-key-of-32-bytes-or-more")
    assert_refused(get_me(token), "token_not_valid")


def test_it_rejects_a_token_whose_claims_were_changed_after_signing(alice, bob):
    header, _, signature = alice.access.split(".")
    claims = {**claims_of(alice.access), "agent_id": "bob"}
    assert_refused(get_me(f"{header}.{b64url(json.dumps(claims).encode())}.{signature}"))


def test_it_rejects_a_validly_signed_token_that_was_never_issued(alice):
    claims = {**claims_of(alice.access), "jti": "f" * 32}
    assert_refused(get_me(signed(claims)), "token_not_valid")


def test_it_rejects_a_token_naming_another_agent_than_its_record(alice, bob):
    claims = {**claims_of(alice.access), "agent_id": "bob"}
    assert_refused(get_me(signed(claims)), "token_not_valid")


def test_it_rejects_an_expired_token(alice):
    past = int((timezone.now() - timedelta(minutes=1)).timestamp())
    claims = {**claims_of(alice.access), "exp": past}
    assert_refused(get_me(signed(claims)), "token_not_valid")


def test_it_rejects_a_token_expired_by_its_lifetime(alice, monkeypatch):
    # Issued through the real issuing path under a lifetime that has already run out.
    monkeypatch.setattr(AccessToken, "lifetime", timedelta(seconds=-1))
    tokens = services.tokens_issue(agent=alice.agent)
    assert claims_of(tokens["access"])["exp"] < timezone.now().timestamp()
    assert_refused(get_me(tokens["access"]), "token_not_valid")


def test_it_rejects_a_refresh_token_used_as_access(alice):
    assert_refused(get_me(alice.refresh), "token_not_valid")


def test_it_rejects_a_revoked_token(alice):
    IssuedToken.objects.filter(jti=claims_of(alice.access)["jti"]).update(revoked_at=timezone.now())
    assert_refused(get_me(alice.access), "token_revoked")


def test_it_rejects_the_token_of_a_deregistered_agent(alice):
    services.agent_deregister(agent=alice.agent)
    assert_refused(get_me(alice.access))


def test_it_rejects_the_token_of_a_disabled_agent(alice):
    services.agent_disable(agent=alice.agent)
    assert_refused(get_me(alice.access))


def test_it_rejects_the_token_of_an_agent_disabled_without_revocation(alice):
    # An operator flipping the state column directly still locks the agent out.
    Agent.objects.filter(pk=alice.agent.pk).update(state=Agent.State.DISABLED)
    assert_refused(get_me(alice.access), "agent_disabled")


@pytest.mark.parametrize(
    "header",
    ["Bearer", "Bearer a b", "Bearer not-a-jwt", "Bearer a.b.c", "Bearer " + "x" * 5000],
)
def test_it_rejects_malformed_bearer_headers(header):
    response = APIClient().get(ME, HTTP_AUTHORIZATION=header)
    assert_refused(response)


def test_it_rejects_an_operator_token_once_the_user_loses_staff(operator, operator_tokens):
    operator.is_staff = False
    operator.save(update_fields=["is_staff"])
    response = APIClient().get(
        "/api/v1/agents/", HTTP_AUTHORIZATION=f"Bearer {operator_tokens['access']}"
    )
    assert_refused(response)


# --- Refresh and rotation -----------------------------------------------------------------------


def refresh(token: str):
    return APIClient().post(REFRESH, {"refresh": token}, format="json")


def test_it_rotates_a_refresh_token(alice):
    response = refresh(alice.refresh)
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"access", "refresh"} and body["refresh"] != alice.refresh
    assert get_me(body["access"]).status_code == 200
    assert refresh(body["refresh"]).status_code == 200


def test_it_refuses_a_refresh_token_after_one_use(alice):
    assert refresh(alice.refresh).status_code == 200
    assert_refused(refresh(alice.refresh), "token_not_valid")


def test_it_refuses_an_access_token_as_refresh(alice):
    assert_refused(refresh(alice.access), "token_not_valid")


def test_it_refuses_a_forged_refresh_token(alice):
    claims = claims_of(alice.refresh)
    assert_refused(refresh(signed(claims, algorithm="HS512")))
    assert_refused(refresh(signed(claims, key="another-key-that-is-long-enough-1234")))
    assert_refused(refresh(signed({**claims, "jti": "0" * 32})))


def test_it_refuses_an_expired_refresh_token(alice):
    past = int((timezone.now() - timedelta(seconds=5)).timestamp())
    assert_refused(refresh(signed({**claims_of(alice.refresh), "exp": past})))


def test_it_refuses_a_refresh_token_of_a_deregistered_agent(alice):
    services.agent_deregister(agent=alice.agent)
    assert_refused(refresh(alice.refresh))


def test_it_refuses_a_refresh_token_of_an_agent_disabled_without_revocation(alice):
    Agent.objects.filter(pk=alice.agent.pk).update(state=Agent.State.DISABLED)
    assert_refused(refresh(alice.refresh), "agent_disabled")


def test_it_names_the_missing_refresh_field():
    response = APIClient().post(REFRESH, {}, format="json")
    assert response.status_code == 400
    assert "refresh" in response.json()["errors"]


def test_it_rotates_operator_refresh_tokens_and_blacklists_the_old_one(operator_tokens):
    response = refresh(operator_tokens["refresh"])
    assert response.status_code == 200
    assert get_me(response.json()["access"]).status_code == 403  # an operator is not an agent
    assert_refused(refresh(operator_tokens["refresh"]))


@pytest.mark.django_db(transaction=True)
def test_only_one_of_two_concurrent_refreshes_wins(make_agent):
    alice = make_agent("alice")
    barrier = threading.Barrier(4)
    statuses = []

    def worker():
        try:
            barrier.wait()
            statuses.append(refresh(alice.refresh).status_code)
        finally:
            connection.close()

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert sorted(statuses) == [200, 401, 401, 401]
    # One rotation: the original pair plus exactly one new pair.
    assert IssuedToken.objects.filter(agent=alice.agent).count() == 4
