"""One upstream WebSocket kept connected, alive and subscribed: the I/O shell.

An :class:`UpstreamLink` owns the public or the private connection. It connects
through the shared :class:`ConnectGate` (Upbit allows 5 connects/s and bans repeat
offenders), keeps the connection honest, and reconnects with jittered exponential
backoff, restoring every stream. Two checks, because a pong proves only that something
answers pongs (a proxy, a load balancer, the server's WebSocket library):

- a dead path (socket open, nothing arriving, pings unanswered) is reported ``stale`` and
  closed within ``2 x keepalive`` (8 s): WebSocket pings every ``keepalive`` s;
- an application stall (pongs, but no data and no ``{"status":"UP"}``) is reported
  ``stale`` and closed within ``3.25 x keepalive`` (13 s): a text ``PING`` once the
  connection has been silent a while, decided by :class:`broker.keepalive.AppLiveness`.

A new connection counts as up only once both have answered: the pong and the
application's answer to ``PING``.

What to send and when (the ONE subscription message Upbit allows, coalesced, paced,
resent in full on every change, checked against LIST_SUBSCRIPTIONS) is decided by its
:class:`broker.request_policy.RequestPolicy`; the link only feeds it what happens on the
socket and carries out what it answers.

Frames go to ``on_frame`` undecoded, so the data path decides what to do with them;
state changes go to ``on_status``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

from aiohttp import WSMsgType

from broker.config import ConfigError
from broker.credentials import Credentials
from broker.exchange import Exchange
from broker.keepalive import PROBE, AppLiveness, Probe, Stalled
from broker.logs import LogThrottle, get_logger
from broker.ratelimit import (
    Backoff,
    BanStore,
    Window,
    WindowLimiter,
    ban_seconds,
    parse_block_seconds,
    steady_time,
)
from broker.request_policy import (
    CONFIRM_AFTER,
    MESSAGE_LIMITS,
    Carried,
    Close,
    Event,
    ListSubscriptions,
    Mismatch,
    Refused,
    RequestPolicy,
    Subscribe,
    Wait,
)
from broker.subscriptions import UpstreamStream
from broker.wsclient import ConnectFailed, UpgradeRefused, WebSocket, WsClient
from schemas.upbit import SubscriptionList, UpbitError, UpbitMessage

__all__ = ["KEEPALIVE_ENV", "ConnectGate", "LinkStats", "UpstreamLink", "keepalive_setting"]

_BINARY = WSMsgType.BINARY
_TEXT = WSMsgType.TEXT
_PING = WSMsgType.PING
_PONG = WSMsgType.PONG

LinkState = Literal["idle", "connecting", "up", "down", "auth_failed"]
ConnectionName = Literal["public", "private"]
BAN_KIND = "ws-connect"
STABLE_FRAMES = 16
"""Frames on one connection after which it counts as working and backoff starts over."""


KEEPALIVE = 4.0
"""Seconds between WebSocket pings, and the time a pong may take (see the module's
docstring for what it bounds)."""
KEEPALIVE_ENV = "UPBIT_BROKER_KEEPALIVE"
"""Overrides :data:`KEEPALIVE`: tests shrink it to see stalls and quiet periods in less
time. Production keeps the default (stall bounds of 8 s and 13 s)."""


def keepalive_setting(env: Mapping[str, str]) -> float:
    """The keepalive interval: ``UPBIT_BROKER_KEEPALIVE`` seconds, else 4."""
    raw = env.get(KEEPALIVE_ENV, "").strip()
    if not raw:
        return KEEPALIVE
    try:
        value = float(raw)
    except ValueError:
        value = 0.0
    if not 0.1 <= value <= 60.0:
        raise ConfigError(f"{KEEPALIVE_ENV} must be seconds between 0.1 and 60, not {raw!r}")
    return value


KEYS_PROVEN = 5.0
"""Seconds a request signed with once-rejected keys must go unrefused before the keys
count as good again (Upbit refuses bad keys at once, and says nothing when it accepts)."""


class ConnectGate:
    """Shared by every link: keeps upgrades under Upbit's 5/s and honours a 418 ban.

    The ban is remembered in ``bans`` (a file-backed store) so a broker restarted
    during a block waits the block out instead of deepening it.
    """

    def __init__(self, bans: BanStore, *, per_second: int = 4) -> None:
        self._limiter = WindowLimiter([(per_second, 1.0)])
        self._bans = bans
        self._log = get_logger("connect-gate")

    def blocked_for(self, now: float) -> float:
        """Seconds left of an Upbit block on connects (0 when none)."""
        return max(0.0, self._bans.blocked_until(BAN_KIND, now) - now)

    async def acquire(self) -> None:
        """Wait until a connect attempt is allowed."""
        while True:
            now = steady_time()
            blocked = self.blocked_for(now)
            if blocked > 0:
                self._log.warning(
                    "waiting out an Upbit block on connects", seconds=round(blocked, 1)
                )
                await asyncio.sleep(min(blocked, 5.0))
                continue
            if self._limiter.try_acquire(now):
                return
            await asyncio.sleep(max(self._limiter.delay(now), 0.01))

    def on_banned(self, seconds: float) -> None:
        """Upbit answered 418: stop connecting until the block ends, across restarts."""
        until = steady_time() + seconds
        self._bans.block(BAN_KIND, until)
        self._log.error("Upbit blocked connects (418)", seconds=seconds)


@dataclass
class LinkStats:
    """Counters and times of one link, for health and metrics."""

    state: LinkState = "idle"
    since: float = 0.0
    reconnects: int = 0
    connects: int = 0
    requests_sent: int = 0
    frames: int = 0
    decode_errors: int = 0
    upstream_errors: int = 0
    verifications: int = 0
    mismatches: int = 0
    last_frame_at: float | None = None
    down_since: float | None = None
    """Wall-clock time the link stopped carrying data (None while up or idle)."""


class UpstreamLink:
    """The public or the private upstream connection of the broker."""

    def __init__(
        self,
        name: ConnectionName,
        exchange: Exchange,
        gate: ConnectGate,
        *,
        on_frame: Callable[[bytes | str, int], list[UpbitMessage] | None],
        on_status: Callable[[ConnectionName, str, str], None],
        on_rejected: Callable[[frozenset[UpstreamStream], str], None] | None = None,
        on_carried: Callable[[frozenset[UpstreamStream]], None] | None = None,
        widen_types: Collection[str] = (),
        keepalive: float = KEEPALIVE,
        coalesce: float = 0.05,
        compression: bool = True,
        message_limits: Iterable[Window] | None = None,
        verify_interval: float = 60.0,
        idle_close: float = 30.0,
        credentials: Credentials | None = None,
    ) -> None:
        """``widen_types``: stream types a scarce request carries for every market of a
        new code's quote, once :meth:`set_markets` has named the markets (none: never).
        ``credentials``: the keys this link signs with (the private link), shared with
        every other user of them: rejected keys are tried once a minute at most."""
        self.name: ConnectionName = name
        self.stats = LinkStats(since=time.time())
        self._exchange = exchange
        self._gate = gate
        self._on_frame = on_frame
        self._on_status = on_status
        self._on_rejected = on_rejected
        self._on_carried = on_carried
        self._policy = RequestPolicy(
            exchange,
            coalesce=coalesce,
            message_limits=tuple(message_limits or MESSAGE_LIMITS),
            verify_interval=verify_interval,
            idle_close=idle_close,
            widen_types=widen_types,
            confirm_after=CONFIRM_AFTER,
        )
        self._credentials = credentials
        self._error_log = LogThrottle()
        """Upbit's error frames are counted in full (stats) but logged ten a minute."""
        self._keepalive = keepalive
        self._compression = compression
        self._wake = asyncio.Event()
        """Set by every input to the policy: the run loop and the driver look again."""
        self._ws: WebSocket | None = None
        self._pong = asyncio.Event()
        # Capped at 10 s: REST fallback carries the data meanwhile, and 0.1 connects/s
        # is far inside Upbit's 5/s.
        self._backoff = Backoff(first=0.2, cap=10.0)
        self._was_up = False
        """The link carried data since it last connected afresh (see :func:`status_event`)."""
        self._log = get_logger("upstream", link=name)

    # ------------------------------------------------------------------ public API

    @property
    def wanted(self) -> frozenset[UpstreamStream]:
        """The streams this link should carry."""
        return self._policy.target

    @property
    def carried(self) -> frozenset[UpstreamStream]:
        """The streams the last accepted request asked for (what Upbit sends now)."""
        return self._policy.carried

    @property
    def is_up(self) -> bool:
        """True while connected."""
        return self.stats.state == "up"

    def requests_left(self, now: float) -> int:
        """Requests this connection's budget still allows in the current minute
        (``now``: ``time.monotonic()``)."""
        return self._policy.requests_left(now)

    def down_for(self, now: float) -> float | None:
        """Seconds the link has been unable to carry its streams; None when fine."""
        since = self.stats.down_since
        return None if since is None else now - since

    def set_streams(self, streams: frozenset[UpstreamStream]) -> None:
        """Make the link carry exactly ``streams`` (sent after the coalescing window)."""
        if streams != self._policy.target:
            self._policy.set_target(streams, time.monotonic())
            self._wake.set()

    def set_markets(self, markets: Collection[str]) -> None:
        """The exchange's markets, over which scarce requests are widened."""
        self._policy.set_markets(markets)

    async def drop(self) -> None:
        """Close the connection now; :meth:`run` reconnects (used by tests and checks)."""
        if self._ws is not None:
            await self._ws.close()

    async def run(self) -> None:
        """Connect, subscribe, read; reconnect forever until cancelled."""
        client = WsClient()
        try:
            await self._run(client)
        finally:
            await client.close()

    async def _run(self, client: WsClient) -> None:
        while True:
            if not self._policy.target:
                self._set_state("idle", "no streams to carry")
                # Cleared first: a change already undone (streams added then released
                # before this task ran) would leave it set, and waiting on a set event
                # returns at once: the loop would spin and freeze the whole broker.
                self._wake.clear()
                await self._wake.wait()
                continue
            credentials = self._credentials
            if credentials is not None:
                # Rejected keys: one try a minute, shared with the REST fallback.
                delay = credentials.wait(time.monotonic())
                if delay > 0.0:
                    await asyncio.sleep(delay)
                    continue
                if not credentials.take_try(time.monotonic()):
                    continue
            await self._gate.acquire()
            self._set_state("connecting", "connecting")
            ws = await self._connect(client)
            if ws is None:
                await asyncio.sleep(self._backoff.next_delay())
                continue
            try:
                await self._serve(ws)
            finally:
                self._ws = None
                self._apply(self._policy.on_disconnected())
                with contextlib.suppress(Exception):
                    await ws.close()
            if self._credentials is not None and self._credentials.rejected:
                continue  # auth_failed was reported; not a blip, so no "down"
            if self._policy.target:
                self.stats.reconnects += 1
                self._set_state("down", "connection lost")
                # First retry right away (within 1 s), later ones back off.
                await asyncio.sleep(self._backoff.next_delay())

    # ------------------------------------------------------------------ internals

    def _set_state(self, state: LinkState, detail: str) -> None:
        """Record a state change and report it as an event clients understand.

        Once the link has carried data, ``connecting`` is reported as ``reconnecting``
        and ``up`` as ``restored`` (every stream was requested again); a link that was
        never up, or went idle (nobody wanted its streams), connects afresh.
        """
        if state == self.stats.state:
            return
        previous = self.stats.state
        now = time.time()
        self.stats.state = state
        self.stats.since = now
        if state in ("up", "idle"):
            self.stats.down_since = None
        elif self.stats.down_since is None:
            self.stats.down_since = now
        event = status_event(state, was_up=self._was_up)
        if state == "up":
            self._was_up = True
        elif state == "idle":
            self._was_up = False
        self._log.info("link state", state=event, previous=previous, detail=detail)
        if state == "up" and self._credentials is not None and self._credentials.rejected:
            return  # connected, but with keys Upbit rejected: up once they prove good
        self._on_status(self.name, event, detail)

    async def _connect(self, client: WsClient) -> WebSocket | None:
        private = self.name == "private"
        try:
            ws = await client.connect(
                self._exchange.ws_url(private),
                self._exchange.connect_headers(private),
                compression=self._compression,
            )
        except UpgradeRefused as exc:
            self._log.warning("upgrade refused", status=exc.status)
            if exc.status == 401 and self._credentials is not None:
                self._keys_rejected(f"HTTP 401 on the private WebSocket upgrade ({exc.status})")
            if exc.status == 418:
                self._gate.on_banned(ban_seconds(parse_block_seconds(exc.body)))
            return None
        except ConnectFailed as exc:
            self._log.warning("connect failed", detail=str(exc))
            return None
        except Exception as exc:  # never let one bad attempt end the link for good
            self._log.exception("connect attempt crashed", error=type(exc).__name__)
            return None
        self.stats.connects += 1
        self._ws = ws
        return ws

    async def _serve(self, ws: WebSocket) -> None:
        # A handshake proves little: a stalled server may still accept upgrades. The link
        # counts as up only once the server answers a ping and its application a PING.
        app = await self._first_answers(ws)
        if app is None:
            return
        self._set_state("up", "connected")
        self._policy.on_connected(time.monotonic())
        reader = asyncio.create_task(self._reader(ws), name=f"{self.name}-reader")
        tasks = [
            reader,
            asyncio.create_task(self._driver(ws), name=f"{self.name}-requests"),
            asyncio.create_task(self._keepalive_loop(ws), name=f"{self.name}-keepalive"),
            asyncio.create_task(self._app_watch(ws, app), name=f"{self.name}-app-watch"),
        ]
        try:
            # The reader ends with the connection; a helper only ends by closing it. A
            # helper that fails (a bug) must not leave a link that reads but never sends
            # again: the connection is dropped and the next one starts afresh.
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                error = None if task.cancelled() else task.exception()
                if error is not None and task is not reader:
                    self._log.error(
                        "link task failed; reconnecting", task=task.get_name(), exc_info=error
                    )
            if reader in done:
                reader.result()  # the reader's own failure propagates, as before
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _first_answers(self, ws: WebSocket) -> AppLiveness | None:
        """Ping and read until the pong, then PING the application and read until it
        answers: its liveness tracker, or None (closed, no pong, or no answer)."""
        try:
            async with asyncio.timeout(self._keepalive):
                await ws.ping()  # inside: a peer that stopped reading can block the send
                while True:
                    msg = await ws.receive()
                    if msg.type is _PONG:
                        break
                    if not await self._early_message(ws, msg.type, msg.data):
                        return None
        except (TimeoutError, ConnectionError):
            self._log.warning("no pong after connecting; retrying")
            return None
        app = AppLiveness(time.monotonic(), self.stats.frames, keepalive=self._keepalive)
        try:
            while not app.answered:
                action = app.step(time.monotonic(), self.stats.frames)
                if isinstance(action, Stalled):
                    self._log.warning("Upbit's application does not answer; retrying")
                    return None
                if isinstance(action, Probe):
                    async with asyncio.timeout(self._keepalive):
                        await ws.send_str(PROBE)
                try:
                    msg = await ws.receive(timeout=app.poll_every)
                except TimeoutError:
                    continue
                if not await self._early_message(ws, msg.type, msg.data):
                    return None
        except (TimeoutError, ConnectionError):
            return None
        return app

    async def _early_message(self, ws: WebSocket, kind: WSMsgType, data: bytes | str) -> bool:
        """Handle a message read before the reader runs; False when the connection is over.

        Frames go the usual way (an UP is dropped by the router, an error such as
        INVALID_AUTH reaches the policy) and count as the application's answer.
        """
        if kind is _BINARY or kind is _TEXT:
            self.stats.frames += 1
            extra = self._on_frame(data, time.time_ns())
            if extra:
                self._on_control_messages(extra)
        elif kind is _PING:
            await ws.pong(data if isinstance(data, bytes) else data.encode())
        elif kind is not _PONG:
            return False
        return True

    async def _app_watch(self, ws: WebSocket, app: AppLiveness) -> None:
        """PING the application when the connection goes quiet; report ``stale`` and close
        when it stops answering (pongs may still come: see the module docstring).

        Any frame is a sign of life, read from the frame counter, so the reader's hot path
        pays nothing; a quiet market that answers PING never trips it.
        """
        stats = self.stats
        while True:
            await asyncio.sleep(app.poll_every)
            action = app.step(time.monotonic(), stats.frames)
            if isinstance(action, Probe):
                try:
                    await ws.send_str(PROBE)
                except ConnectionError:
                    return  # the reader sees the close too
            elif isinstance(action, Stalled):
                self._log.warning(
                    "Upbit's application stalled; closing", seconds=round(action.silent_for, 1)
                )
                # Told before the close, like a dead path: clients learn why it went quiet.
                self._on_status(self.name, "stale", action.detail)
                await ws.close()
                return

    async def _keepalive_loop(self, ws: WebSocket) -> None:
        """Ping every ``keepalive`` s; report ``stale`` and close when a pong does not
        come within that time.

        A stalled connection (socket open, nothing arriving) is closed within
        ``2 x keepalive`` of its last sign of life.
        """
        while True:
            await asyncio.sleep(self._keepalive)
            self._pong.clear()
            try:
                async with asyncio.timeout(self._keepalive):
                    # The ping inside the timeout too: with the send buffer full (a peer
                    # that stopped reading) it waits for a drain that never comes.
                    await ws.ping()
                    await self._pong.wait()
            except ConnectionError:
                return  # the reader sees the close too
            except TimeoutError:
                detail = f"no answer to a ping within {self._keepalive:g} s; reconnecting"
                self._log.warning("connection stalled; closing", seconds=self._keepalive)
                # Told before the close: clients learn the stream went quiet for a
                # reason, then see it down and back like any other drop.
                self._on_status(self.name, "stale", detail)
                await ws.close()
                return

    async def _reader(self, ws: WebSocket) -> None:
        on_frame = self._on_frame
        stats = self.stats
        receive = ws.receive
        received = 0
        while True:
            msg = await receive()
            kind = msg.type
            if kind is _BINARY or kind is _TEXT:
                now_ns = time.time_ns()  # one clock read per frame (hot path)
                stats.frames += 1
                stats.last_frame_at = now_ns / 1e9
                received += 1
                if received == STABLE_FRAMES:
                    self._backoff.reset()  # this connection works: start backoff afresh
                extra = on_frame(msg.data, now_ns)
                if extra:
                    self._on_control_messages(extra)
            elif kind is _PONG:
                self._pong.set()
            elif kind is _PING:
                with contextlib.suppress(ConnectionError):
                    await ws.pong(msg.data)
            else:  # CLOSE, CLOSING, CLOSED or ERROR: the connection is over
                self._log.warning("connection closed", code=ws.close_code, kind=kind.name)
                return

    def _keys_rejected(self, reason: str) -> None:
        """Upbit rejected the keys: report it once, close, and try again in a minute."""
        assert self._credentials is not None
        if self._credentials.on_rejected(reason, time.monotonic()):
            self._log.error(
                "Upbit rejected the API keys; trying them again once a minute", reason=reason
            )
        self._set_state("auth_failed", f"Upbit rejected the API keys: {reason}")
        ws = self._ws
        if ws is not None:
            task = asyncio.ensure_future(ws.close())
            task.add_done_callback(lambda t: t.cancelled() or t.exception())

    def _keys_held(self, ws: WebSocket) -> None:
        """A request signed with once-rejected keys went unrefused: they work again."""
        credentials = self._credentials
        if credentials is not None and self._ws is ws and credentials.on_accepted():
            self._log.info("Upbit accepts the API keys again")
            self._on_status(self.name, "up", "Upbit accepts the API keys again")

    async def _driver(self, ws: WebSocket) -> None:
        """Carry out what the policy answers: send, close, or wait for time or an input."""
        policy = self._policy
        wake = self._wake
        while True:
            wake.clear()  # before asking: an input from here on wakes the wait below
            action = policy.next_request(time.monotonic())
            if action is None or isinstance(action, Wait):
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(None if action is None else action.seconds):
                        await wake.wait()
            elif isinstance(action, Close):
                self._log.info("closing the connection", reason=action.reason)
                await ws.close()
                return
            elif isinstance(action, Subscribe):
                streams = sorted(action.streams, key=_sort_key)
                await ws.send_str(self._exchange.subscription_message(streams, action.new))
                self.stats.requests_sent += 1
                if self._credentials is not None and self._credentials.rejected:
                    asyncio.get_running_loop().call_later(
                        KEYS_PROVEN, functools.partial(self._keys_held, ws)
                    )
                if action.widened:
                    self._log.info(
                        "requests are scarce: the request carries siblings ahead of demand",
                        widened=len(action.widened),
                        streams=len(action.streams),
                    )
                self._log.debug(
                    "subscription sent", streams=len(action.streams), new=len(action.new)
                )
                self._apply(policy.on_sent(action, time.monotonic()))
            elif isinstance(action, ListSubscriptions):
                await ws.send_str(self._exchange.list_subscriptions_message())
                self.stats.verifications += 1
                self._apply(policy.on_sent(action, time.monotonic()))

    def _on_control_messages(self, messages: list[UpbitMessage]) -> None:
        """Upbit's answers (error frames, listings) go to the policy."""
        now = time.monotonic()
        for message in messages:
            if isinstance(message, UpbitError):
                name, text = str(message.error.name), message.error.message
                self.stats.upstream_errors += 1
                if self._credentials is not None and self._exchange.is_auth_error(name):
                    self._keys_rejected(f"{name}: {text}"[:200])
                    continue
                held = self._error_log.allow(now)
                if held is not None:
                    self._log.error(
                        "Upbit sent an error", error=name, message=text[:200], held_back=held
                    )
                self._apply(self._policy.on_error(name, text, now))
            elif isinstance(message, SubscriptionList):
                self._apply(self._policy.on_listing(message, now))
        self._wake.set()

    def _apply(self, events: Iterable[Event]) -> None:
        """Report the policy's events: what is carried now, refusals, mismatches."""
        for event in events:
            if isinstance(event, Carried):
                if self._on_carried is not None:
                    self._on_carried(event.streams)
            elif isinstance(event, Refused):
                self._log.error(
                    "Upbit refused a request", error=event.name, streams=len(event.streams)
                )
                if event.plain_from_now:
                    self._log.warning(
                        "Upbit refused a widened request; plain requests on this connection"
                    )
                elif self._on_rejected is not None:
                    self._on_rejected(event.streams, event.name)
            elif isinstance(event, Mismatch):
                self.stats.mismatches += 1
                self._log.warning(
                    "Upbit serves something else than requested; resending",
                    missing=len(event.missing),
                    unexpected=len(event.unexpected),
                )


def status_event(state: LinkState, *, was_up: bool) -> str:
    """The status clients are told for a link entering ``state``: ``reconnecting`` and
    ``restored`` only for a link that was up, never for its first connect."""
    if was_up:
        return {"connecting": "reconnecting", "up": "restored"}.get(state, state)
    return state


def _sort_key(stream: UpstreamStream) -> tuple[str, str, int, float]:
    return (stream.type, stream.code or "", stream.depth or 0, stream.level or 0.0)
