"""Exchange REST endpoints on a real aiohttp server, signed the way Upbit's docs sign."""

from __future__ import annotations

import asyncio
import hashlib
import json
import uuid
from collections.abc import AsyncIterator
from datetime import datetime
from decimal import Decimal as D
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlencode

import jwt
import pytest
from aiohttp import ClientSession, web
from aiohttp.test_utils import TestClient, TestServer
from yarl import URL

from schemas.bus import OrderChance
from schemas.rest import decode_rest
from simulator.account import Account
from simulator.auth import JwtVerifier
from simulator.rest_private import add_private_routes

pytestmark = pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")

ACCESS = "rest-access-key-0123456789abcdefghijklmn"
SECRET = "rest-secret-key-ZYXWVUTSRQPONMLKJIHGFEDC"
ASKS = [(100_000_000.0, 0.5), (100_100_000.0, 1.0)]
BIDS = [(99_900_000.0, 0.5), (99_800_000.0, 1.0)]
BOOKS: dict[str, tuple[list[tuple[float, float]], list[tuple[float, float]]]] = {
    "KRW-BTC": (ASKS, BIDS),
    "KRW-XRP": ([(700.0, 1000.0)], [(690.0, 1000.0)]),
}
ORDER_FIELDS = {
    "uuid", "side", "ord_type", "price", "state", "market", "created_at", "volume",
    "remaining_volume", "executed_volume", "reserved_fee", "remaining_fee", "paid_fee",
    "locked", "executed_funds", "trades_count", "identifier", "time_in_force", "smp_type",
    "prevented_volume", "prevented_locked",
}  # fmt: skip


def sign(params: dict[str, Any] | None, *, secret: str = SECRET, access: str = ACCESS) -> str:
    """Authorization header exactly as Upbit's Python sample builds it."""
    payload: dict[str, Any] = {"access_key": access, "nonce": str(uuid.uuid4())}
    if params:
        query = unquote(urlencode(params, doseq=True)).encode("utf-8")
        payload["query_hash"] = hashlib.sha512(query).hexdigest()
        payload["query_hash_alg"] = "SHA512"
    return "Bearer " + jwt.encode(payload, secret, algorithm="HS512")


class Api:
    """A signed Upbit REST caller bound to a test server."""

    def __init__(self, client: TestClient[web.Request, web.Application]) -> None:
        self.client = client
        self.errors: list[str] = []  # raw error bodies, checked for leaked secrets

    async def request(
        self,
        method: str,
        path: str,
        params: dict[str, Any] | None = None,
        *,
        body: Any = None,
        auth: str | bool | None = True,
        raw_brackets: bool = True,
    ) -> tuple[int, Any]:
        headers: dict[str, str] = {}
        url = URL(str(self.client.make_url(path)), encoded=True)
        data = None
        if method in ("GET", "DELETE"):
            if params:
                qs = urlencode(params, doseq=True, quote_via=quote)
                if raw_brackets:
                    qs = qs.replace("%5B%5D=", "[]=")
                url = URL(f"{url}?{qs}", encoded=True)
            signed = params
        else:
            data = body if isinstance(body, str) else json.dumps(body)
            headers["Content-Type"] = "application/json; charset=utf-8"
            signed = body if isinstance(body, dict) else None
        if auth is True:
            headers["Authorization"] = sign(signed)
        elif isinstance(auth, str):
            headers["Authorization"] = auth
        async with self.client.session.request(method, url, data=data, headers=headers) as r:
            text = await r.text()
            if r.status >= 400:
                self.errors.append(text + "|" + headers.get("Authorization", ""))
                self._check_error(text, headers.get("Authorization"))
            return r.status, json.loads(text)

    @staticmethod
    def _check_error(text: str, authorization: str | None) -> None:
        body = json.loads(text)
        assert set(body) == {"error"}
        assert set(body["error"]) == {"name", "message"}
        assert isinstance(body["error"]["name"], str)
        assert SECRET not in text
        if authorization:
            token = authorization.split()[-1]
            assert token not in text
            for part in token.split("."):
                assert len(part) < 8 or part not in text

    async def order(self, **body: Any) -> dict[str, Any]:
        status, answer = await self.request("POST", "/v1/orders", body=body)
        assert status == 201, answer
        return dict(answer)


@pytest.fixture
def account() -> Account:
    return Account(balances={"KRW": D("100000000"), "BTC": D("1")})


@pytest.fixture
async def api(account: Account) -> AsyncIterator[Api]:
    app = web.Application()
    add_private_routes(app, account=account, verifier=JwtVerifier(ACCESS, SECRET), books=BOOKS.get)
    async with TestClient(TestServer(app)) as client:
        yield Api(client)


def limit_bid(price: str, volume: str, **extra: Any) -> dict[str, Any]:
    return {"market": "KRW-BTC", "side": "bid", "volume": volume, "price": price,
            "ord_type": "limit", **extra}  # fmt: skip


async def test_accounts(api: Api) -> None:
    status, body = await api.request("GET", "/v1/accounts")
    assert status == 200
    assert body == [
        {"currency": "KRW", "balance": "100000000.0", "locked": "0.0", "avg_buy_price": "0",
         "avg_buy_price_modified": False, "unit_currency": "KRW"},
        {"currency": "BTC", "balance": "1.0", "locked": "0.0", "avg_buy_price": "0",
         "avg_buy_price_modified": False, "unit_currency": "KRW"},
    ]  # fmt: skip


async def test_auth_failures(api: Api) -> None:
    status, body = await api.request("GET", "/v1/accounts", auth=None)
    assert (status, body["error"]["name"]) == (401, "no_authorization_token")
    wrong_secret = sign(None, secret="another-secret-another-secret-another-se")
    status, body = await api.request("GET", "/v1/accounts", auth=wrong_secret)
    assert (status, body["error"]["name"]) == (401, "jwt_verification")
    status, body = await api.request("GET", "/v1/accounts", auth=sign(None, access="nobody"))
    assert (status, body["error"]["name"]) == (401, "invalid_access_key")
    status, body = await api.request("GET", "/v1/accounts", auth="Bearer garbage.garbage.x")
    assert (status, body["error"]["name"]) == (401, "jwt_verification")
    reused = sign(None)
    status, _ = await api.request("GET", "/v1/accounts", auth=reused)
    assert status == 200
    status, body = await api.request("GET", "/v1/accounts", auth=reused)
    assert (status, body["error"]["name"]) == (401, "nonce_used")
    # Hash over other parameters than those sent.
    params = {"market": "KRW-BTC"}
    status, body = await api.request(
        "GET", "/v1/orders/open", params, auth=sign({"market": "KRW-ETH"})
    )
    assert (status, body["error"]["name"]) == (401, "invalid_query_payload")
    # Parameters sent without any hash.
    status, body = await api.request("GET", "/v1/orders/open", params, auth=sign(None))
    assert (status, body["error"]["name"]) == (401, "invalid_query_payload")
    # POST body changed after signing.
    signed = sign(limit_bid("99000000", "0.1"))
    status, body = await api.request(
        "POST", "/v1/orders", body=limit_bid("99000000", "0.2"), auth=signed
    )
    assert (status, body["error"]["name"]) == (401, "invalid_query_payload")
    assert len(api.errors) == 8


async def test_post_order_resting(api: Api, account: Account) -> None:
    seen: list[dict[str, object]] = []
    account.add_listener(seen.append)
    order = await api.order(**limit_bid("99000000", "0.1", identifier="mine-1"))
    assert set(order) >= ORDER_FIELDS
    assert order["state"] == "wait"
    assert order["side"] == "bid"
    assert order["ord_type"] == "limit"
    assert order["price"] == "99000000"
    assert order["volume"] == "0.1"
    assert order["remaining_volume"] == "0.1"
    assert order["executed_volume"] == "0"
    assert order["reserved_fee"] == "4950"
    assert order["locked"] == "9904950"
    assert order["trades_count"] == 0
    assert order["identifier"] == "mine-1"
    assert order["created_at"].endswith("+09:00")
    assert order["time_in_force"] is None
    assert [e["type"] for e in seen] == ["myOrder", "myAsset"]
    _, accounts = await api.request("GET", "/v1/accounts")
    assert accounts[0]["balance"] == "90095050.0"
    assert accounts[0]["locked"] == "9904950.0"


async def test_taker_order_reply_is_the_accepted_order(api: Api) -> None:
    order = await api.order(**limit_bid("100100000", "0.6", identifier="t-1"))
    # Upbit answers with the order as accepted; matching shows up in later queries.
    assert order["state"] == "wait"
    assert order["executed_volume"] == "0"
    status, full = await api.request("GET", "/v1/order", {"uuid": order["uuid"]})
    assert status == 200
    assert full["state"] == "done"
    assert full["executed_volume"] == "0.6"
    assert full["paid_fee"] == "30005"
    assert full["executed_funds"] == "60010000"
    assert full["trades_count"] == 2
    assert len(full["trades"]) == 2
    trade = full["trades"][0]
    assert set(trade) == {"market", "uuid", "price", "volume", "funds", "trend", "created_at",
                          "side"}  # fmt: skip
    assert (trade["price"], trade["volume"], trade["funds"]) == ("100000000", "0.5", "50000000")
    status, by_identifier = await api.request("GET", "/v1/order", {"identifier": "t-1"})
    assert status == 200
    assert by_identifier["uuid"] == order["uuid"]


async def test_json_number_values_are_hashed_as_sent(api: Api) -> None:
    body = {"market": "KRW-BTC", "side": "bid", "ord_type": "limit", "price": 99000000,
            "volume": 0.1}  # fmt: skip
    order = await api.order(**body)
    assert order["price"] == "99000000"
    assert order["volume"] == "0.1"


@pytest.mark.parametrize(
    ("body", "name"),
    [
        ({"market": "KRW-BTC", "ord_type": "limit", "price": "1", "volume": "1"},
         "validation_error"),
        ({"market": "KRW-NOPE", "side": "bid", "ord_type": "limit", "price": "99000000",
          "volume": "0.1"}, "validation_error"),
        ({"side": "bid", "ord_type": "limit", "price": "1", "volume": "1"}, "validation_error"),
        ({"market": "KRW-BTC", "side": "bid", "ord_type": "limit", "price": "abc",
          "volume": "0.1"}, "validation_error"),
        ({"market": "KRW-BTC", "side": "bid", "ord_type": "limit", "price": True,
          "volume": "0.1"}, "validation_error"),
        (limit_bid("99000000", "2"), "insufficient_funds_bid"),
        (limit_bid("99000001", "0.1"), "invalid_price_bid"),
        (limit_bid("99000000", "0.00005"), "under_min_total_bid"),
        ({"market": "KRW-BTC", "side": "ask", "ord_type": "market", "volume": "3"},
         "insufficient_funds_ask"),
        ({"market": "KRW-BTC", "side": "bid", "ord_type": "price", "price": "10000",
          "volume": "1"}, "create_bid_error"),
    ],
)  # fmt: skip
async def test_order_refusals(api: Api, body: dict[str, Any], name: str) -> None:
    status, answer = await api.request("POST", "/v1/orders", body=body)
    assert (status, answer["error"]["name"]) == (400, name)


async def test_side_message_and_bad_json(api: Api) -> None:
    _, answer = await api.request(
        "POST", "/v1/orders", body={"market": "KRW-BTC", "ord_type": "limit"}
    )
    assert answer["error"]["message"] == "side is missing, side does not have a valid value"
    status, answer = await api.request("POST", "/v1/orders", body="{not json")
    assert (status, answer["error"]["name"]) == (400, "validation_error")


async def test_duplicated_identifier(api: Api) -> None:
    await api.order(**limit_bid("99000000", "0.1", identifier="dup"))
    status, answer = await api.request(
        "POST", "/v1/orders", body=limit_bid("99000000", "0.1", identifier="dup")
    )
    assert (status, answer["error"]["name"]) == (400, "duplicated_identifier")


async def test_open_orders(api: Api) -> None:
    first = await api.order(**limit_bid("99000000", "0.1"))
    second = await api.order(**limit_bid("98000000", "0.1"))
    xrp = await api.order(market="KRW-XRP", side="bid", ord_type="limit", price="600",
                          volume="10")  # fmt: skip
    status, orders = await api.request("GET", "/v1/orders/open", {"market": "KRW-BTC"})
    assert status == 200
    assert [o["uuid"] for o in orders] == [second["uuid"], first["uuid"]]  # newest first
    assert "trades" not in orders[0]
    assert set(orders[0]) >= ORDER_FIELDS
    _, orders = await api.request("GET", "/v1/orders/open")
    assert len(orders) == 3
    assert orders[0]["uuid"] == xrp["uuid"]
    for raw in (True, False):
        params = {"market": "KRW-BTC", "states[]": ["wait", "watch"], "limit": 10}
        status, orders = await api.request("GET", "/v1/orders/open", params, raw_brackets=raw)
        assert status == 200
        assert len(orders) == 2
    params = {"limit": 1, "page": 2, "order_by": "asc"}
    _, orders = await api.request("GET", "/v1/orders/open", params)
    assert [o["uuid"] for o in orders] == [second["uuid"]]
    for bad in ({"limit": 101}, {"state": "wait", "states[]": ["wait"]}, {"state": "done"},
                {"order_by": "up"}, {"page": 0}):  # fmt: skip
        status, answer = await api.request("GET", "/v1/orders/open", bad)
        assert (status, answer["error"]["name"]) == (400, "validation_error"), bad


async def test_closed_orders(api: Api, account: Account) -> None:
    resting = await api.order(**limit_bid("99000000", "0.1"))
    status, _ = await api.request("DELETE", "/v1/order", {"uuid": resting["uuid"]})
    assert status == 200
    filled = await api.order(market="KRW-BTC", side="ask", ord_type="market", volume="0.1")
    _, orders = await api.request("GET", "/v1/orders/closed")
    assert [o["uuid"] for o in orders] == [filled["uuid"], resting["uuid"]]
    assert orders[0]["state"] == "done"
    assert orders[1]["state"] == "cancel"
    _, orders = await api.request("GET", "/v1/orders/closed", {"state": "cancel"})
    assert [o["uuid"] for o in orders] == [resting["uuid"]]
    _, orders = await api.request(
        "GET", "/v1/orders/closed", {"states[]": ["done", "cancel"], "limit": 1}
    )
    assert len(orders) == 1
    created = account.get_order(uuid=filled["uuid"])
    assert created is not None
    iso = filled["created_at"]  # "+09:00" travels percent-encoded and is hashed decoded
    _, orders = await api.request("GET", "/v1/orders/closed", {"start_time": iso})
    assert filled["uuid"] in [o["uuid"] for o in orders]
    later_ms = int((created.created + 3600) * 1000)
    _, orders = await api.request("GET", "/v1/orders/closed", {"start_time": later_ms})
    assert orders == []
    status, answer = await api.request(
        "GET",
        "/v1/orders/closed",
        {"start_time": "2025-06-01T00:00:00+09:00", "end_time": "2025-06-09T00:00:00+09:00"},
    )
    assert (status, answer["error"]["name"]) == (400, "validation_error")


async def test_closed_orders_page_oldest_first_from_a_start_time_in_ms(api: Api) -> None:
    # How the broker pages the closed listing: asc, full pages, the next start_time the
    # last order's created_at (inclusive, so that order comes again).
    placed = []
    for _ in range(3):
        order = await api.order(**limit_bid("99000000", "0.1"))
        await api.request("DELETE", "/v1/order", {"uuid": order["uuid"]})
        placed.append(order["uuid"])
    created = datetime.fromisoformat(
        (await api.request("GET", "/v1/order", {"uuid": placed[0]}))[1]["created_at"]
    )
    start_ms = int(created.timestamp() * 1000)
    params = {"states[]": ["done", "cancel"], "start_time": start_ms, "limit": 2, "order_by": "asc"}
    _, first = await api.request("GET", "/v1/orders/closed", params)
    assert [o["uuid"] for o in first] == placed[:2]
    _, orders = await api.request("GET", "/v1/orders/closed", {**params, "limit": 1000})
    assert [o["uuid"] for o in orders] == placed
    _, none = await api.request(
        "GET", "/v1/orders/closed", {**params, "start_time": start_ms + 3_600_000}
    )
    assert none == []


async def test_cancel(api: Api) -> None:
    order = await api.order(**limit_bid("99000000", "0.1", identifier="to-cancel"))
    status, reply = await api.request("DELETE", "/v1/order", {"identifier": "to-cancel"})
    assert status == 200
    assert reply["uuid"] == order["uuid"]
    assert reply["state"] == "wait"
    _, now = await api.request("GET", "/v1/order", {"uuid": order["uuid"]})
    assert now["state"] == "cancel"
    assert now["trades"] == []
    _, accounts = await api.request("GET", "/v1/accounts")
    assert accounts[0]["balance"] == "100000000.0"
    assert accounts[0]["locked"] == "0.0"
    status, answer = await api.request("DELETE", "/v1/order", {"uuid": order["uuid"]})
    assert (status, answer["error"]["name"]) == (404, "order_not_found")


async def test_unknown_order(api: Api) -> None:
    missing = {"uuid": str(uuid.uuid4())}
    for method in ("GET", "DELETE"):
        status, answer = await api.request(method, "/v1/order", missing)
        assert (status, answer["error"]["name"]) == (404, "order_not_found")
        assert answer["error"]["message"] == "주문을 찾지 못했습니다."
    status, answer = await api.request("GET", "/v1/order")
    assert (status, answer["error"]["name"]) == (400, "validation_error")


async def test_orders_by_uuids(api: Api) -> None:
    a = await api.order(**limit_bid("99000000", "0.1", identifier="ida"))
    b = await api.order(**limit_bid("98000000", "0.1", identifier="idb"))
    params = {"uuids[]": [a["uuid"], b["uuid"], str(uuid.uuid4())]}
    status, orders = await api.request("GET", "/v1/orders/uuids", params)
    assert status == 200
    assert [o["uuid"] for o in orders] == [b["uuid"], a["uuid"]]
    _, orders = await api.request(
        "GET", "/v1/orders/uuids", {"identifiers[]": ["ida"], "order_by": "asc"}
    )
    assert [o["uuid"] for o in orders] == [a["uuid"]]
    _, orders = await api.request(
        "GET", "/v1/orders/uuids", {"uuids[]": [a["uuid"]], "market": "KRW-XRP"}
    )
    assert orders == []
    for bad in ({}, {"uuids[]": [a["uuid"]], "identifiers[]": ["ida"]},
                {"uuids[]": [str(i) for i in range(101)]}):  # fmt: skip
        status, answer = await api.request("GET", "/v1/orders/uuids", bad)
        assert (status, answer["error"]["name"]) == (400, "validation_error")


async def test_sim_controls(api: Api, account: Account) -> None:
    status, accounts = await api.request(
        "POST", "/_sim/account", body={"balances": {"KRW": "1000000", "eth": "2"}}, auth=None
    )
    assert status == 200
    assert {a["currency"]: a["balance"] for a in accounts} == {
        "KRW": "1000000.0",
        "BTC": "1.0",
        "ETH": "2.0",
    }
    status, order = await api.request(
        "POST",
        "/_sim/orders",
        body={"market": "KRW-BTC", "side": "ask", "ord_type": "market", "volume": "0.5"},
        auth=None,
    )
    assert status == 201
    assert order["state"] == "done"
    assert len(order["trades"]) == 1
    assert account.balances()["KRW"].balance == D("1000000") + D("49950000") - D("24975")
    status, answer = await api.request(
        "POST", "/_sim/orders", body=limit_bid("99000000", "5"), auth=None
    )
    assert (status, answer["error"]["name"]) == (400, "insufficient_funds_bid")
    status, answer = await api.request(
        "POST", "/_sim/account", body={"balances": {"KRW": "-1"}}, auth=None
    )
    assert status == 400
    status, accounts = await api.request("POST", "/_sim/account", body={"reset": True}, auth=None)
    assert status == 200
    assert accounts[0]["balance"] == "100000000.0"


async def raw_call(
    api: Api, method: str, path: str, params: dict[str, Any], *, form: bool, query: str = ""
) -> tuple[int, Any]:
    """A GET/DELETE with its parameters in a body: form-encoded (pyupbit's
    ``requests.get(url, data=...)``) or JSON; signed over those parameters (plus ``query``)."""
    url = URL(str(api.client.make_url(path)) + (f"?{query}" if query else ""), encoded=True)
    signed = dict(parse_qsl(query)) | params
    headers = {"Authorization": sign(signed)}
    if form:
        data: str = urlencode(params, doseq=True)
        headers["Content-Type"] = "application/x-www-form-urlencoded"
    else:
        data = json.dumps(params)
        headers["Content-Type"] = "application/json"
    async with api.client.session.request(method, url, data=data, headers=headers) as r:
        return r.status, json.loads(await r.text())


@pytest.mark.parametrize("form", [True, False])
async def test_get_and_delete_take_parameters_from_a_body(api: Api, form: bool) -> None:
    order = await api.order(**limit_bid("99000000", "0.1", identifier="body-1"))
    status, got = await raw_call(api, "GET", "/v1/order", {"uuid": order["uuid"]}, form=form)
    assert (status, got["uuid"]) == (200, order["uuid"])
    status, got = await raw_call(api, "GET", "/v1/order", {"identifier": "body-1"}, form=form)
    assert (status, got["uuid"]) == (200, order["uuid"])
    status, listed = await raw_call(
        api, "GET", "/v1/orders/open", {"states[]": ["wait", "watch"]}, form=form,
        query="market=KRW-BTC",
    )  # fmt: skip
    assert status == 200
    assert [o["uuid"] for o in listed] == [order["uuid"]]
    status, got = await raw_call(api, "DELETE", "/v1/order", {"uuid": order["uuid"]}, form=form)
    assert (status, got["uuid"]) == (200, order["uuid"])
    _, after = await api.request("GET", "/v1/order", {"uuid": order["uuid"]})
    assert after["state"] == "cancel"


async def test_a_body_signed_over_other_parameters_is_refused(api: Api) -> None:
    order = await api.order(**limit_bid("99000000", "0.1"))
    url = URL(str(api.client.make_url("/v1/order")), encoded=True)
    headers = {"Authorization": sign({"uuid": str(uuid.uuid4())}),
               "Content-Type": "application/x-www-form-urlencoded"}  # fmt: skip
    async with api.client.session.get(url, data=f"uuid={order['uuid']}", headers=headers) as r:
        body = await r.json()
    assert (r.status, body["error"]["name"]) == (401, "invalid_query_payload")
    headers = {"Authorization": sign(None), "Content-Type": "application/json"}
    async with api.client.session.get(url, data="[1, 2", headers=headers) as r:
        body = await r.json()
    assert (r.status, body["error"]["name"]) == (400, "validation_error")


def pyupbit_sign(params: dict[str, Any] | None) -> str:
    """Authorization header as pyupbit 0.2.x builds it: HS256, and the hash over
    ``urlencode(params, doseq=True)`` with only ``%5B%5D=`` put back to ``[]=``."""
    payload: dict[str, Any] = {"access_key": ACCESS, "nonce": str(uuid.uuid4())}
    if params is not None:
        query = urlencode(params, doseq=True).replace("%5B%5D=", "[]=")
        payload["query_hash"] = hashlib.sha512(query.encode()).hexdigest()
        payload["query_hash_alg"] = "SHA512"
    return "Bearer " + jwt.encode(payload, SECRET, algorithm="HS256")


async def pyupbit_call(api: Api, method: str, path: str, data: dict[str, Any]) -> tuple[int, Any]:
    """One request shaped as pyupbit sends it: GET and DELETE with ``requests``'s
    ``data=dict`` (a form body, no query string), POST with a JSON body."""
    headers = {"Authorization": pyupbit_sign(data)}
    if method == "POST":
        body = json.dumps(data)
        headers |= {"Accept": "application/json", "Content-Type": "application/json"}
    else:
        body = urlencode(data, doseq=True)
        headers["Content-Type"] = "application/x-www-form-urlencoded"
    url = URL(str(api.client.make_url(path)), encoded=True)
    async with api.client.session.request(method, url, data=body, headers=headers) as r:
        assert r.headers.get("Content-Type", "").startswith("application/json")
        return r.status, await r.json()


async def test_pyupbit_get_order_by_ticker_or_uuid_and_cancel_order(api: Api) -> None:
    placed = {"market": "KRW-BTC", "side": "bid", "volume": "0.001", "price": "99000000",
              "ord_type": "limit"}  # fmt: skip
    status, order = await pyupbit_call(api, "POST", "/v1/orders", placed)  # buy_limit_order
    assert status == 201
    sold = await api.order(market="KRW-BTC", side="ask", ord_type="market", volume="0.01")
    # get_order("KRW-BTC"): the legacy listing with its defaults, in a form body.
    listing = {"market": "KRW-BTC", "state": "wait", "page": 1, "limit": 100, "order_by": "desc"}
    status, orders = await pyupbit_call(api, "GET", "/v1/orders", listing)
    assert status == 200
    assert [o["uuid"] for o in orders] == [order["uuid"]]
    status, orders = await pyupbit_call(api, "GET", "/v1/orders", listing | {"state": "done"})
    assert [o["uuid"] for o in orders] == [sold["uuid"]]
    # get_order(uuid) and get_individual_order(uuid): GET /v1/order with a form body.
    status, got = await pyupbit_call(api, "GET", "/v1/order", {"uuid": order["uuid"]})
    assert (status, got["state"], got["trades"]) == (200, "wait", [])
    # cancel_order(uuid): DELETE /v1/order with a form body; the reply is the order as it was.
    status, got = await pyupbit_call(api, "DELETE", "/v1/order", {"uuid": order["uuid"]})
    assert (status, got["uuid"], got["state"]) == (200, order["uuid"], "wait")
    status, got = await pyupbit_call(api, "GET", "/v1/order", {"uuid": order["uuid"]})
    assert got["state"] == "cancel"
    status, got = await pyupbit_call(api, "DELETE", "/v1/order", {"uuid": order["uuid"]})
    assert (status, got["error"]["name"]) == (404, "order_not_found")


async def test_legacy_order_list_filters_pages_and_refuses_bad_parameters(api: Api) -> None:
    first = await api.order(**limit_bid("99000000", "0.1", identifier="lg-1"))
    second = await api.order(**limit_bid("98000000", "0.1", identifier="lg-2"))
    xrp = await api.order(market="KRW-XRP", side="bid", ord_type="limit", price="600",
                          volume="10")  # fmt: skip
    done = await api.order(market="KRW-BTC", side="ask", ord_type="market", volume="0.1")
    await api.request("DELETE", "/v1/order", {"uuid": second["uuid"]})

    async def uuids(params: dict[str, Any] | None = None) -> list[str]:
        status, orders = await api.request("GET", "/v1/orders", params)
        assert status == 200, orders
        return [o["uuid"] for o in orders]

    assert await uuids() == [xrp["uuid"], first["uuid"]]  # state=wait by default, newest first
    assert await uuids({"market": "KRW-BTC"}) == [first["uuid"]]
    assert await uuids({"state": "cancel"}) == [second["uuid"]]
    assert await uuids({"states[]": ["done", "cancel"], "order_by": "asc"}) == [
        second["uuid"],
        done["uuid"],
    ]
    assert await uuids({"states[]": ["wait", "watch"], "limit": 1, "page": 2}) == [first["uuid"]]
    assert await uuids({"uuids[]": [first["uuid"], second["uuid"]]}) == [first["uuid"]]
    assert await uuids({"identifiers[]": ["lg-2"], "state": "cancel"}) == [second["uuid"]]
    assert await uuids({"uuids[]": [first["uuid"]], "identifiers[]": ["lg-2"]}) == []
    status, orders = await api.request("GET", "/v1/orders", {"market": "KRW-BTC"})
    assert set(orders[0]) >= ORDER_FIELDS
    assert "trades" not in orders[0]
    for bad in ({"states[]": ["wait", "done"]}, {"state": "wait", "states[]": ["wait"]},
                {"state": "open"}, {"limit": 101}, {"limit": 0}, {"page": 0},
                {"order_by": "newest"}, {"page": "x"}):  # fmt: skip
        status, answer = await api.request("GET", "/v1/orders", bad)
        assert (status, answer["error"]["name"]) == (400, "validation_error"), bad
    status, answer = await api.request("GET", "/v1/orders", auth=None)
    assert (status, answer["error"]["name"]) == (401, "no_authorization_token")


async def test_cancel_by_uuids(api: Api, account: Account) -> None:
    a = await api.order(**limit_bid("99000000", "0.1", identifier="bu-a"))
    b = await api.order(**limit_bid("98000000", "0.1", identifier="bu-b"))
    sold = await api.order(market="KRW-BTC", side="ask", ord_type="market", volume="0.1")
    missing = str(uuid.uuid4())
    status, answer = await api.request(
        "DELETE", "/v1/orders/uuids", {"uuids[]": [a["uuid"], sold["uuid"], missing]}
    )
    assert status == 200
    assert answer["success"] == {
        "count": 1,
        "orders": [{"uuid": a["uuid"], "market": "KRW-BTC", "identifier": "bu-a"}],
    }
    assert answer["failed"]["count"] == 2
    assert [o["uuid"] for o in answer["failed"]["orders"]] == [sold["uuid"], missing]
    status, answer = await api.request("DELETE", "/v1/orders/uuids", {"identifiers[]": ["bu-b"]})
    assert (status, answer["success"]["orders"][0]["uuid"]) == (200, b["uuid"])
    assert account.open_orders() == []
    for bad in ({}, {"uuids[]": [a["uuid"]], "identifiers[]": ["bu-a"]},
                {"uuids[]": [str(uuid.uuid4()) for _ in range(21)]}):  # fmt: skip
        status, answer = await api.request("DELETE", "/v1/orders/uuids", bad)
        assert (status, answer["error"]["name"]) == (400, "validation_error"), bad


async def test_cancel_by_uuids_reads_only_the_query_string(api: Api) -> None:
    order = await api.order(**limit_bid("99000000", "0.1"))
    status, answer = await raw_call(
        api, "DELETE", "/v1/orders/uuids", {"uuids[]": [order["uuid"]]}, form=True
    )
    assert (status, answer["error"]["name"]) == (401, "invalid_query_payload")


async def test_cancel_open_orders_by_filters(api: Api, account: Account) -> None:
    bids = [await api.order(**limit_bid(str(99_000_000 - i * 100_000), "0.1")) for i in range(3)]
    ask = await api.order(market="KRW-BTC", side="ask", ord_type="limit", price="101000000",
                          volume="0.1")  # fmt: skip
    xrp = await api.order(market="KRW-XRP", side="bid", ord_type="limit", price="600",
                          volume="10")  # fmt: skip
    status, answer = await api.request(
        "DELETE", "/v1/orders/open",
        {"cancel_side": "bid", "pairs": "KRW-BTC", "count": 2, "order_by": "asc"},
    )  # fmt: skip
    assert status == 200
    assert [o["uuid"] for o in answer["success"]["orders"]] == [b["uuid"] for b in bids[:2]]
    assert answer["failed"] == {"count": 0, "orders": []}
    _, answer = await api.request(
        "DELETE", "/v1/orders/open", {"quote_currencies": "KRW", "excluded_pairs": "KRW-XRP"}
    )
    assert [o["uuid"] for o in answer["success"]["orders"]] == [ask["uuid"], bids[2]["uuid"]]
    assert [o.uuid for o in account.open_orders()] == [xrp["uuid"]]
    _, answer = await api.request("DELETE", "/v1/orders/open")
    assert answer["success"]["count"] == 1
    for bad in ({"cancel_side": "both"}, {"pairs": "KRW-BTC", "quote_currencies": "KRW"},
                {"count": 301}, {"count": 0}):  # fmt: skip
        status, answer = await api.request("DELETE", "/v1/orders/open", bad)
        assert (status, answer["error"]["name"]) == (400, "validation_error"), bad


async def test_orders_past_the_order_group_limit_get_429() -> None:
    from simulator.app import start_simulator
    from simulator.config import DEFAULT_REST_LIMITS, SimConfig

    limit = DEFAULT_REST_LIMITS["order"][0]
    config = SimConfig(access_key=ACCESS, secret_key=SECRET, rate=5.0)
    async with await start_simulator(config) as running:
        base = running.urls["rest"]
        async with ClientSession() as session:

            async def place(i: int) -> tuple[int, str, str]:
                body = {"market": "KRW-BTC", "side": "bid", "ord_type": "limit",
                        "price": "1000000", "volume": "0.01", "identifier": f"rl-{i}"}  # fmt: skip
                headers = {"Authorization": sign(body), "Content-Type": "application/json"}
                async with session.post(f"{base}/v1/orders", json=body, headers=headers) as r:
                    return r.status, r.headers.get("Remaining-Req", ""), await r.text()

            results = await asyncio.gather(*(place(i) for i in range(limit + 3)))
    statuses = [status for status, _, _ in results]
    assert statuses.count(201) <= limit
    assert 429 in statuses
    assert all(s in (201, 429) for s in statuses)
    assert all("group=order" in header for _, header, _ in results)
    assert {text for status, _, text in results if status == 429} == {"Too many API requests."}


# The keys of Upbit's documented GET /v1/orders/chance answer (docs.upbit.com example).
CHANCE_KEYS = {"bid_fee", "ask_fee", "maker_bid_fee", "maker_ask_fee", "market",
               "bid_account", "ask_account"}  # fmt: skip
CHANCE_MARKET_KEYS = {"id", "name", "order_types", "order_sides", "bid_types", "ask_types",
                      "bid", "ask", "max_total", "state"}  # fmt: skip
ACCOUNT_KEYS = {"currency", "balance", "locked", "avg_buy_price", "avg_buy_price_modified",
                "unit_currency"}  # fmt: skip


async def test_order_chance_answers_upbits_shape_with_the_accounts_balances(api: Api) -> None:
    await api.order(**limit_bid("99000000", "0.1"))
    status, chance = await api.request("GET", "/v1/orders/chance", {"market": "KRW-BTC"})
    assert status == 200
    assert set(chance) == CHANCE_KEYS
    assert set(chance["market"]) == CHANCE_MARKET_KEYS
    assert set(chance["bid_account"]) == set(chance["ask_account"]) == ACCOUNT_KEYS
    _, accounts = await api.request("GET", "/v1/accounts")
    assert [chance["bid_account"], chance["ask_account"]] == accounts
    assert chance["bid_account"]["locked"] == "9904950.0"
    decoded = decode_rest(json.dumps(chance), OrderChance)  # what the broker reads
    assert decoded.market.id == "KRW-BTC"
    assert decoded.bid_fee == D("0.0005")
    assert decoded.market.bid is not None
    assert decoded.market.bid.min_total == D("5000")


@pytest.mark.parametrize("form", [True, False])
async def test_order_chance_takes_its_market_from_a_body_too(api: Api, form: bool) -> None:
    _, by_query = await api.request("GET", "/v1/orders/chance", {"market": "KRW-XRP"})
    status, by_body = await raw_call(
        api, "GET", "/v1/orders/chance", {"market": "KRW-XRP"}, form=form
    )
    assert status == 200
    assert by_body == by_query
    assert by_body["ask_account"]["currency"] == "XRP"


async def test_order_chance_refuses_a_missing_or_unknown_market_and_no_signature(
    api: Api,
) -> None:
    status, body = await api.request("GET", "/v1/orders/chance")
    assert (status, body["error"]) == (
        400, {"name": "validation_error", "message": "market is missing"}
    )  # fmt: skip
    status, body = await api.request("GET", "/v1/orders/chance", {"market": "KRW-NOPE"})
    assert (status, body["error"]["name"]) == (400, "validation_error")
    assert "market" in body["error"]["message"]
    status, body = await api.request(
        "GET", "/v1/orders/chance", {"market": "KRW-BTC"}, auth=sign(None)
    )
    assert (status, body["error"]["name"]) == (401, "invalid_query_payload")
