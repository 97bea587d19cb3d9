"""The control plane: the ROUTER socket where clients hello, subscribe and beat.

Each request is answered on the same ROUTER identity, with ``ROUTER_MANDATORY`` and
``NOBLOCK``: a vanished or congested client costs one dropped reply, never a stalled
broker. Unreadable or unknown messages get an :class:`schemas.bus.ErrorReply` with
``bad_message``; the broker never raises on what a client sends. Every request is
validated as a whole before it changes any state, so one client's bad code cannot
touch anybody else's streams.

Shared by every program on the machine, it treats each client as possibly hostile:
per-client quotas (:mod:`broker.quotas`) bound what one client may cost; the serve loop
answers at most :data:`BATCH` requests before it lets the data path run; a client is
known by a keyed hash of its ROUTER identity, so no reply, log line or metric reveals a
routing id (with one, a peer could claim another's, or the next one libzmq generates).
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import secrets
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any

import msgspec
import zmq
import zmq.asyncio

from broker.liveness import ClientTable
from broker.logs import get_logger
from broker.ports import (
    BrokerStatus,
    MarketList,
    QuoteService,
    SnapshotSource,
    Subscriptions,
    TradingService,
)
from broker.quotas import ClientQuotas, QuotaError
from broker.rest import RestError
from broker.snapshots import SnapshotTooBig
from broker.subscriptions import SpecError, normalize_spec
from schemas.bus import (
    PROTOCOL_VERSION,
    AccountQuery,
    BrokerMessage,
    Bye,
    CancelOrder,
    ClientMessage,
    Envelope,
    ErrorReply,
    GetSnapshot,
    HealthReply,
    HealthRequest,
    Heartbeat,
    Hello,
    MetricsReply,
    MetricsRequest,
    PlaceOrder,
    Quote,
    SnapshotReply,
    StreamSpec,
    Subscribe,
    SubscribeOk,
    Unsubscribe,
    UnsubscribeOk,
    Welcome,
    decode_client_message,
    encode,
)
from schemas.errors import DecodeError

__all__ = ["ControlServer", "Reply"]

MAX_STREAMS_PER_REQUEST = 1000
MARKETS_WAIT = 3.0
"""How long a subscribe waits for Upbit's market list before it is refused with
``upstream_unavailable``: well inside a client's 5 s request timeout, so the client
learns what is wrong instead of timing out."""
FETCHING = 2
"""Snapshot requests that fetch over REST at the same time (each is paced anyway by
the REST limits every process on the host shares)."""
MAX_PENDING = 16
"""Requests waiting on REST (snapshots) or on the market list at once; past it a
snapshot request is refused ``busy`` at once rather than queued past its timeout."""
BATCH = 64
"""Requests answered in one turn of the event loop before the data path gets its turn."""
QUOTES_PER_CLIENT = 2
"""Quote requests (quotation REST through the broker) one client may have in flight;
past it the next is refused ``busy`` at once."""

TRADES_PER_CLIENT = 16
"""Account and order requests one client may have in flight (orders wait their turn in
the pocket's budget, so a client placing 10 a second has several queued); past it the
next is refused ``busy`` at once."""
MAX_TRADING = 64
"""Account and order requests in flight over all clients; past it ``busy``, except for a
client with fewer than :data:`TRADES_ALWAYS` of its own: a few busy clients must not
shut everyone else out of trading."""
WELCOME_ECHOES = (0.05, 0.25, 1.0)
"""Seconds after a batch of Welcomes at which the broker calls ``on_welcome`` again (it
publishes a heartbeat): the client waits for data before it subscribes."""
TRADES_ALWAYS = 2
"""Requests in flight a client is always allowed, however busy the others keep the
broker (so at most MAX_TRADING + 2 per client are in flight)."""

TradingMessage = AccountQuery | PlaceOrder | CancelOrder

Reply = tuple[bytes, BrokerMessage]
"""One answer: the ROUTER identity of the client, and the message to send it."""


class ControlServer:
    """Reads client requests from the ROUTER socket and answers them.

    :meth:`handle` turns one request into its replies without any socket; :meth:`serve`
    is the thin loop around it. Requests that must wait (a subscribe before the market
    list is known, a snapshot fetched over REST) answer later, from a task of their own.
    """

    def __init__(
        self,
        *,
        clients: ClientTable,
        subscriptions: Subscriptions,
        markets: MarketList,
        snapshots: SnapshotSource,
        status: BrokerStatus,
        epoch: str,
        heartbeat_interval: float,
        liveness: int,
        private_enabled: bool,
        quotas: ClientQuotas | None = None,
        quotes: QuoteService | None = None,
        trading: TradingService | None = None,
        on_welcome: Callable[[], None] | None = None,
    ) -> None:
        """``private_enabled``: the broker has API keys (private streams can be served);
        ``quotes`` answers quote requests, ``trading`` account and order requests (each
        refused ``unknown_type`` without it). ``on_welcome`` runs after a Welcome went
        out (the broker publishes a heartbeat: the client waits for data on its SUB
        before it subscribes, and need not wait for the next interval)."""
        self._on_welcome = on_welcome
        self._welcome_echoes: asyncio.TimerHandle | None = None
        """The follow-up calls of ``on_welcome`` still to come (one series at a time)."""
        self._clients = clients
        self._subscriptions = subscriptions
        self._markets = markets
        self._snapshots = snapshots
        self._status = status
        self._epoch = epoch
        self._heartbeat_interval = heartbeat_interval
        self._liveness = liveness
        self._private_enabled = private_enabled
        self.quotas = quotas if quotas is not None else ClientQuotas()
        self._quotes = quotes
        self._quoting: Counter[str] = Counter()
        """Quote requests in flight per client."""
        self._trading = trading
        self._trades: Counter[str] = Counter()
        """Account and order requests in flight per client."""
        self._trade_tasks: set[asyncio.Task[None]] = set()
        self._key = secrets.token_bytes(16)
        self._socket: zmq.Socket[bytes] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._fetching = asyncio.Semaphore(FETCHING)
        """Snapshot requests fetching over REST at once; the others wait their turn."""
        self.requests = 0
        self.errors = 0
        self.unroutable = 0
        self._log = get_logger("control")

    async def serve(self, socket: zmq.asyncio.Socket) -> None:
        """Answer requests until cancelled."""
        # Replies go through a synchronous shadow: NOBLOCK errors surface right here.
        sync: zmq.Socket[bytes] = zmq.Socket.shadow(socket.underlying)
        self._socket = sync
        try:
            await self._serve(socket, sync)
        finally:
            if self._welcome_echoes is not None:  # nothing is published once stopped
                self._welcome_echoes.cancel()
                self._welcome_echoes = None

    async def _serve(self, socket: zmq.asyncio.Socket, sync: zmq.Socket[bytes]) -> None:
        while True:
            frames = await socket.recv_multipart()
            welcomed = False
            for _ in range(BATCH):
                for identity, message in self.handle(frames, time.monotonic()):
                    self._send(identity, message)
                    welcomed = welcomed or isinstance(message, Welcome)
                try:
                    frames = sync.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
            else:
                # A flood: let the data path (and everyone else's requests) run first.
                for identity, message in self.handle(frames, time.monotonic()):
                    self._send(identity, message)
                    welcomed = welcomed or isinstance(message, Welcome)
            if welcomed and self._on_welcome is not None:
                self._on_welcome()  # once per batch, however many hellos it held
                if self._welcome_echoes is None:
                    self._echo_welcome(0)
            await asyncio.sleep(0)

    def _echo_welcome(self, step: int) -> None:
        """Call ``on_welcome`` again after each of :data:`WELCOME_ECHOES` (one series
        at a time, whatever the number of hellos): a client whose SUB was still
        connecting when the first heartbeat went out hears the next within a moment,
        not an interval later."""
        if step:
            assert self._on_welcome is not None
            self._on_welcome()
        if step >= len(WELCOME_ECHOES):
            self._welcome_echoes = None
            return
        delay = WELCOME_ECHOES[step] - (WELCOME_ECHOES[step - 1] if step else 0.0)
        self._welcome_echoes = asyncio.get_running_loop().call_later(
            delay, self._echo_welcome, step + 1
        )

    def client_key(self, identity: bytes) -> str:
        """The id a client is known by: a keyed hash of its ROUTER identity, never the id."""
        return hashlib.blake2b(identity, key=self._key, digest_size=8).hexdigest()

    # ---------------------------------------------------------------- dispatch

    def handle(self, frames: Sequence[bytes], now: float) -> list[Reply]:
        """The replies to one request (ROUTER frames: identity, message) at monotonic ``now``.

        Never raises: whatever a client sends, the worst it gets is an ErrorReply.
        """
        self.requests += 1
        identity = frames[0]
        admitted = self.quotas.admit(self.client_key(identity), now)
        if not admitted:
            if admitted is None:
                return []
            limit = self.quotas.quotas
            refusal = ErrorReply(
                _request_id(frames[-1]),
                "rate_limited",
                f"more than {limit.rate:g} requests a second (burst {limit.burst}); slow down",
            )
            return [self._refuse(identity, refusal)]
        if len(frames) != 2:
            return [self._refuse(identity, ErrorReply(None, "bad_message", "expected one frame"))]
        try:
            message = decode_client_message(frames[1])
        except (DecodeError, RecursionError) as exc:
            # Name the bad field, and answer the request it came with when its id can
            # still be read, so the client fails at once instead of timing out.
            text = str(exc) if isinstance(exc, DecodeError) else "message nested too deeply"
            refusal = ErrorReply(_request_id(frames[1]), "bad_message", text)
            return [self._refuse(identity, refusal)]
        try:
            return self._dispatch(identity, message, now)
        except Exception as exc:  # never let one request kill the broker
            self._log.exception("request failed", op=type(message).__name__)
            internal = f"internal error ({type(exc).__name__})"
            req = getattr(message, "req", None)
            return [self._refuse(identity, ErrorReply(req, "internal", internal))]

    def _dispatch(self, identity: bytes, message: ClientMessage, now: float) -> list[Reply]:
        if isinstance(message, Hello):
            return [self._hello(identity, message, now)]
        client = self.client_key(identity)
        if not self._clients.known(client):
            if isinstance(message, Bye):
                return []
            req = getattr(message, "req", None)
            refusal = ErrorReply(req, "unknown_client", "unknown client: send hello first")
            return [self._refuse(identity, refusal)]
        self._clients.touch(client, now)
        if isinstance(message, Heartbeat):
            # The client's own word, averaged into everyone's metrics: kept plausible.
            self._clients.report(
                client,
                max(0, message.received),
                max(0, message.gaps),
                _plausible_lag(message.lag_ms),
                max(0, message.dropped),
            )
        elif isinstance(message, Subscribe):
            if self._markets.markets is None:
                self._spawn(self._subscribe_when_ready(identity, client, message))
            else:
                return [self._subscribe(identity, client, message)]
        elif isinstance(message, Unsubscribe):
            return [self._unsubscribe(identity, client, message)]
        elif isinstance(message, GetSnapshot):
            if len(self._tasks) >= MAX_PENDING:
                busy = ErrorReply(
                    message.req,
                    "busy",
                    f"the broker is answering {len(self._tasks)} requests over REST "
                    "already; try again shortly",
                )
                return [self._refuse(identity, busy)]
            try:
                self.quotas.start_snapshot(client)
            except QuotaError as exc:
                return [self._refuse(identity, ErrorReply(message.req, exc.code, str(exc)))]
            self._spawn(self._get_snapshot(identity, client, message))
        elif isinstance(message, Quote):
            turned_away = self._quote_refusal(client, message)
            if turned_away is not None:
                return [self._refuse(identity, turned_away)]
            assert self._quotes is not None  # checked by _quote_refusal
            self._quoting[client] += 1
            work = self._quotes.answer(message)
            self._spawn(
                self._finish(
                    identity, client, message.req, in_flight=self._quoting, work=work, what="quote"
                )
            )
        elif isinstance(message, AccountQuery | PlaceOrder | CancelOrder):
            turned_away = self._trading_refusal(client, message)
            if turned_away is not None:
                return [self._refuse(identity, turned_away)]
            assert self._trading is not None  # checked by _trading_refusal
            self._trades[client] += 1
            trade = self._trading.answer(message, client)
            task = asyncio.ensure_future(
                self._finish(
                    identity,
                    client,
                    message.req,
                    in_flight=self._trades,
                    work=trade,
                    what="trading request",
                )
            )
            self._trade_tasks.add(task)
            task.add_done_callback(self._trade_tasks.discard)
        elif isinstance(message, HealthRequest):
            return [(identity, HealthReply(message.req, self._status.health()))]
        elif isinstance(message, MetricsRequest):
            return [(identity, MetricsReply(message.req, self._status.metrics()))]
        elif isinstance(message, Bye):
            self._log.info("client left", client=client)
            self._subscriptions.drop_client(client)
            self.quotas.forget(client)
        return []

    def _hello(self, identity: bytes, message: Hello, now: float) -> Reply:
        if message.protocol != PROTOCOL_VERSION:
            return self._refuse(
                identity,
                ErrorReply(
                    None,
                    "protocol_version",
                    f"broker speaks protocol {PROTOCOL_VERSION}, client sent {message.protocol}",
                ),
            )
        client = self.client_key(identity)
        known = self._clients.known(client)
        try:
            self.quotas.check_hello(
                message.name, message.client_id, known=len(self._clients), is_new=not known
            )
        except QuotaError as exc:
            return self._refuse(identity, ErrorReply(None, exc.code, str(exc)))
        if known:
            self._subscriptions.drop_client(client)  # a re-hello starts afresh
        self._clients.add(client, now, name=message.name, pid=message.pid)
        self._log.info("client joined", client=client, name=message.name, pid=message.pid)
        return (
            identity,
            Welcome(
                epoch=self._epoch,
                protocol=PROTOCOL_VERSION,
                heartbeat_interval=self._heartbeat_interval,
                liveness=self._liveness,
                public_available=self._status.is_available(private=False),
                private_available=self._status.is_available(private=True),
            ),
        )

    def _validate(self, streams: list[StreamSpec]) -> list[StreamSpec]:
        if len(streams) > MAX_STREAMS_PER_REQUEST:
            raise SpecError(
                "too_many_streams",
                f"{len(streams)} streams in one request; the limit is {MAX_STREAMS_PER_REQUEST}",
            )
        markets = self._markets.markets
        specs = [
            normalize_spec(spec, markets=markets, private_available=self._private_enabled)
            for spec in streams
        ]
        refusal = self._status.private_refusal() if self._private_enabled else None
        if refusal is not None and any(spec.is_private for spec in specs):
            # Not a silent SubscribeOk: the auth_failed event went out before this client
            # came, and nothing will flow until the keys work again.
            raise SpecError("private_unavailable", refusal)
        return specs

    def _subscribe(self, identity: bytes, client: str, message: Subscribe) -> Reply:
        try:
            specs = self._validate(message.streams)
            held = self._subscriptions.held(client)
            self.quotas.check_streams(len(held), len(set(specs) - held))
        except (SpecError, QuotaError) as exc:
            self.errors += 1
            return self._refuse(identity, ErrorReply(message.req, exc.code, str(exc)))
        if not self._clients.known(client):
            return self._refuse(
                identity, ErrorReply(message.req, "unknown_client", "client expired")
            )
        self._subscriptions.subscribe(client, specs)
        topics = [spec.topic for spec in specs]
        snapshot: list[Envelope] = []
        cut: list[str] = []
        if message.snapshot and message.replay:
            # Back after a restart: every private message of this broker, not just the
            # last (its first REST sync may have published several before we returned).
            private = [spec.topic for spec in specs if spec.is_private]
            public = [spec.topic for spec in specs if not spec.is_private]
            snapshot = self._snapshots.last_values(public) + self._snapshots.journal(private)
            cut = self._snapshots.journal_cut(private)
        elif message.snapshot:
            snapshot = self._snapshots.last_values(topics)
        return (identity, SubscribeOk(message.req, topics, snapshot, cut))

    async def _subscribe_when_ready(self, identity: bytes, client: str, message: Subscribe) -> None:
        if not await self._markets.wait_markets(MARKETS_WAIT):
            # Without Upbit's market list no code can be checked: refuse, keep nothing.
            refusal = ErrorReply(message.req, "upstream_unavailable", _NO_MARKETS)
            self._send(*self._refuse(identity, refusal))
            return
        self._send(*self._subscribe(identity, client, message))

    def _unsubscribe(self, identity: bytes, client: str, message: Unsubscribe) -> Reply:
        try:
            specs = self._validate(message.streams)
        except SpecError as exc:
            return self._refuse(identity, ErrorReply(message.req, exc.code, str(exc)))
        self._subscriptions.unsubscribe(client, specs)
        return (identity, UnsubscribeOk(message.req))

    async def _get_snapshot(self, identity: bytes, client: str, message: GetSnapshot) -> None:
        try:
            await self._answer_snapshot(identity, message)
        finally:
            self.quotas.end_snapshot(client)

    async def _answer_snapshot(self, identity: bytes, message: GetSnapshot) -> None:
        if self._markets.markets is None and not await self._markets.wait_markets(MARKETS_WAIT):
            refusal = ErrorReply(message.req, "upstream_unavailable", _NO_MARKETS)
            self._send(*self._refuse(identity, refusal))
            return
        try:
            specs = self._validate(message.streams)
        except SpecError as exc:
            self._send(*self._refuse(identity, ErrorReply(message.req, exc.code, str(exc))))
            return
        try:
            async with self._fetching:
                items, missing = await self._snapshots.fetch(specs)
        except SnapshotTooBig as exc:
            self._send(
                *self._refuse(identity, ErrorReply(message.req, "too_many_streams", str(exc)))
            )
            return
        except RestError as exc:
            refusal = ErrorReply(message.req, "upstream_error", str(exc))
            self._send(*self._refuse(identity, refusal))
            return
        self._send(identity, SnapshotReply(message.req, items, missing))

    def _quote_refusal(self, client: str, message: Quote) -> ErrorReply | None:
        """Why ``message`` cannot start now (no gateway, too much in flight), else None."""
        if self._quotes is None:
            return ErrorReply(message.req, "unknown_type", "this broker serves no quotes")
        if len(self._tasks) >= MAX_PENDING:
            return ErrorReply(
                message.req,
                "busy",
                f"the broker is answering {len(self._tasks)} requests over REST already; "
                "try again shortly",
            )
        if self._quoting[client] >= QUOTES_PER_CLIENT:
            return ErrorReply(
                message.req,
                "busy",
                f"{QUOTES_PER_CLIENT} quote requests of this client still in flight; "
                "wait for an answer before asking again",
            )
        return None

    async def _finish(
        self,
        identity: bytes,
        client: str,
        req: int,
        *,
        in_flight: Counter[str],
        work: Awaitable[BrokerMessage],
        what: str,
    ) -> None:
        """Answer one of ``client``'s requests counted in ``in_flight`` (quotes, trading)
        with what ``work`` returns, or an ``internal`` error: never a client left waiting
        out its timeout, nor a count left behind."""
        try:
            reply = await work
        except Exception as exc:
            self._log.exception(f"{what} failed")
            reply = ErrorReply(req, "internal", f"internal error ({type(exc).__name__})")
        finally:
            in_flight[client] -= 1
            if in_flight[client] <= 0:
                del in_flight[client]
        if isinstance(reply, ErrorReply):
            self.errors += 1
            self._send(*self._refuse(identity, reply))
        else:
            self._send(identity, reply)

    def _trading_refusal(self, client: str, message: TradingMessage) -> ErrorReply | None:
        """Why ``message`` cannot start now (no keys, trading off, too much in flight)."""
        if self._trading is None:
            return ErrorReply(message.req, "unknown_type", "this broker serves no trading")
        refused = self._trading.refusal(message)
        if refused is not None:
            return refused
        if len(self._trade_tasks) >= MAX_TRADING and self._trades[client] >= TRADES_ALWAYS:
            return ErrorReply(
                message.req,
                "busy",
                f"the broker has {len(self._trade_tasks)} account and order requests in "
                "flight already; try again shortly (nothing was sent)",
            )
        if self._trades[client] >= TRADES_PER_CLIENT:
            return ErrorReply(
                message.req,
                "busy",
                f"{TRADES_PER_CLIENT} account and order requests of this client still in "
                "flight; wait for an answer before sending more (nothing was sent)",
            )
        return None

    # ---------------------------------------------------------------- plumbing

    def _refuse(self, identity: bytes, error: ErrorReply) -> Reply:
        self._log.info("request refused", code=error.code, message=error.message[:200])
        return (identity, error)

    def prune(self) -> None:
        """Forget the request budgets of clients that are gone (expired without a bye)."""
        for client in self.quotas.clients():
            if not self._clients.known(client):
                self.quotas.forget(client)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _send(self, identity: bytes, message: BrokerMessage) -> None:
        if self._socket is None:
            return
        try:
            self._socket.send_multipart((identity, encode(message)), zmq.NOBLOCK)
        except zmq.ZMQError:
            # Peer gone (EHOSTUNREACH under ROUTER_MANDATORY) or congested (EAGAIN).
            self.unroutable += 1


_NO_MARKETS = (
    "Upbit's market list is not available yet (Upbit unreachable?), so no market code "
    "can be checked; nothing was subscribed; try again"
)
_request_decoder = msgspec.msgpack.Decoder()
MAX_LAG_MS = 86_400_000.0
"""Largest lag a heartbeat may report (a day): more is a broken or lying client."""


def _plausible_lag(lag_ms: float) -> float:
    """``lag_ms`` within ``[0, MAX_LAG_MS]``; NaN counts as no lag."""
    return 0.0 if math.isnan(lag_ms) else min(max(lag_ms, 0.0), MAX_LAG_MS)


def _request_id(data: bytes) -> int | None:
    """The ``req`` of an undecodable request, when it can be read at all."""
    try:
        raw = _request_decoder.decode(data)
    except (msgspec.DecodeError, RecursionError, ValueError):
        return None
    req = raw.get("req") if isinstance(raw, dict) else None
    return req if isinstance(req, int) and not isinstance(req, bool) else None
