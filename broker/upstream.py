"""One upstream WebSocket kept connected, alive and subscribed.

An :class:`UpstreamLink` owns the public or the private connection. It connects
through the shared :class:`ConnectGate` (Upbit allows 5 connects/s and bans repeat
offenders), keeps the connection honest with WebSocket pings (a silent stall — socket
open, nothing arriving, pings unanswered — closes it within ``2 x keepalive``), sends
the ONE subscription message Upbit allows (coalesced, rate limited, resent in full on
every change because Upbit replaces the previous one, snapshots only for new streams),
and reconnects with jittered exponential backoff, restoring every stream.

Frames go to ``on_frame`` undecoded, so the data path decides what to do with them;
state changes go to ``on_status``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from aiohttp import WSMsgType

from broker.exchange import Exchange
from broker.logs import get_logger
from broker.ratelimit import Backoff, BanStore, TokenBucket, WindowLimiter, parse_block_seconds
from broker.subscriptions import UpstreamStream, request_target
from broker.wsclient import ConnectFailed, UpgradeRefused, WebSocket, WsClient
from schemas.upbit import SubscriptionList, UpbitError, UpbitMessage

__all__ = ["ConnectGate", "LinkStats", "UpstreamLink"]

_BINARY = WSMsgType.BINARY
_TEXT = WSMsgType.TEXT
_PING = WSMsgType.PING
_PONG = WSMsgType.PONG

LinkState = Literal["idle", "connecting", "up", "down"]
ConnectionName = Literal["public", "private"]
BAN_KIND = "ws-connect"
SCARCE_HEADROOM = 82
"""Requests left this minute (of 90) below which requests count as scarce: after nine in
a minute, demand is churning (bench/agility.py). Then released streams are not dropped
upstream (a removal is not worth a request; every request goes to additions), and a
request adding a stream carries its siblings too
(:func:`broker.subscriptions.widen_request`), so the next new code is already flowing.
The tenth request, the first to widen, is still inside the burst the pacing allows
(PACING_BURST) and goes out at once. One threshold for both: a request that dropped the
siblings an earlier request added would only have to add them again."""
REMOVAL_RETRY = 2.0
"""Seconds before a deferred removal is tried again."""
STABLE_FRAMES = 16
"""Frames on one connection after which it counts as working and backoff starts over."""
PACING_BURST = 10
"""Requests a connection may send back to back before the per-minute budget is paced
(the rest of it spread evenly over the minute; see :class:`TokenBucket`)."""
MAX_LINGERING = 500
"""Streams nobody wants (released or widened) kept in a request at most: bounds the
request's size, and fits ``ticker`` and ``trade`` of every KRW market (about 2 x 230)."""

Widen = Callable[
    [frozenset[UpstreamStream], frozenset[UpstreamStream] | None, int],
    frozenset[UpstreamStream],
]
"""``(target, sent, limit) -> target``: what a scarce request may add ahead of demand."""


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
            now = time.time()
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
        until = time.time() + seconds
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
        on_rejected: Callable[[frozenset[UpstreamStream]], None] | None = None,
        on_carried: Callable[[frozenset[UpstreamStream]], None] | None = None,
        widen: Widen | None = None,
        keepalive: float = 4.0,
        coalesce: float = 0.05,
        compression: bool = True,
        message_limits: list[tuple[int, float]] | None = None,
        verify_interval: float = 60.0,
        idle_close: float = 30.0,
    ) -> None:
        self.name: ConnectionName = name
        self.stats = LinkStats(since=time.time())
        self._exchange = exchange
        self._gate = gate
        self._on_frame = on_frame
        self._on_status = on_status
        self._on_rejected = on_rejected
        self._on_carried = on_carried
        self._widen = widen
        self._widen_off = False
        """Upbit refused a widened request on this connection: plain requests only."""
        self._widened: frozenset[UpstreamStream] = frozenset()
        self._keepalive = keepalive
        self._coalesce = coalesce
        self._compression = compression
        self._message_limits = message_limits or [(4, 1.0), (90, 60.0)]
        self._limiter = WindowLimiter(self._message_limits)
        longest = max(self._message_limits, key=lambda w: w[1])
        self._pace = TokenBucket.pacing(longest, min(PACING_BURST, longest[0] - 1))
        self._verify_interval = verify_interval
        self._idle_close = idle_close
        self._wanted: frozenset[UpstreamStream] = frozenset()
        self._sent: frozenset[UpstreamStream] | None = None
        self._last_good: frozenset[UpstreamStream] = frozenset()
        self._rejected: frozenset[UpstreamStream] | None = None
        self._sent_at = 0.0
        self._changed = asyncio.Event()
        self._retry: asyncio.Future[None] | None = None
        self._ws: WebSocket | None = None
        self._pong = asyncio.Event()
        # Capped at 10 s: REST fallback carries the data meanwhile, and 0.1 connects/s
        # is far inside Upbit's 5/s.
        self._backoff = Backoff(first=0.2, cap=10.0)
        self._log = get_logger("upstream", link=name)

    # ------------------------------------------------------------------ public API

    @property
    def wanted(self) -> frozenset[UpstreamStream]:
        """The streams this link should carry."""
        return self._wanted

    @property
    def carried(self) -> frozenset[UpstreamStream]:
        """The streams the last accepted request asked for (what Upbit sends now)."""
        return self._sent or frozenset()

    @property
    def is_up(self) -> bool:
        """True while connected."""
        return self.stats.state == "up"

    def requests_left(self, now: float) -> int:
        """Requests this connection's budget still allows in the current minute."""
        return self._limiter.headroom(now)

    def down_for(self, now: float) -> float | None:
        """Seconds the link has been unable to carry its streams; None when fine."""
        since = self.stats.down_since
        return None if since is None else now - since

    def set_streams(self, streams: frozenset[UpstreamStream]) -> None:
        """Make the link carry exactly ``streams`` (sent after the coalescing window)."""
        if streams != self._wanted:
            self._wanted = streams
            self._changed.set()

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
            if not self._wanted:
                self._set_state("idle", "no streams to carry")
                # Cleared first: a change already undone (streams added then released
                # before this task ran) would leave it set, and waiting on a set event
                # returns at once: the loop would spin and freeze the whole broker.
                self._changed.clear()
                await self._changed.wait()
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
                self._set_sent(None)
                with contextlib.suppress(Exception):
                    await ws.close()
            if self._wanted:
                self.stats.reconnects += 1
                self._set_state("down", "connection lost")
                # First retry right away (within 1 s), later ones back off.
                await asyncio.sleep(self._backoff.next_delay())

    # ------------------------------------------------------------------ internals

    def _set_state(self, state: LinkState, detail: str) -> None:
        """Record a state change and report it as an event clients understand.

        After the first connection, ``connecting`` is reported as ``reconnecting`` and
        ``up`` as ``restored`` (every stream was requested again).
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
        event: str = state
        if self.stats.connects > (0 if state == "connecting" else 1):
            event = {"connecting": "reconnecting", "up": "restored"}.get(state, state)
        self._log.info("link state", state=event, previous=previous, detail=detail)
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
            if exc.status == 418:
                self._gate.on_banned(parse_block_seconds(exc.body) or 60.0)
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
        # counts as up only once the server answers a ping.
        if not await self._first_pong(ws):
            self._log.warning("no pong after connecting; retrying")
            return
        self._set_state("up", "connected")
        self._limiter.reset()  # Upbit counts messages per connection
        self._widen_off = False
        self._pace.reset()
        self._changed.set()  # a new connection carries nothing: send the full request
        reader = asyncio.create_task(self._reader(ws), name=f"{self.name}-reader")
        tasks = [
            reader,
            asyncio.create_task(self._sender(ws), name=f"{self.name}-sender"),
            asyncio.create_task(self._verifier(ws), name=f"{self.name}-verifier"),
            asyncio.create_task(self._keepalive_loop(ws), name=f"{self.name}-keepalive"),
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

    async def _first_pong(self, ws: WebSocket) -> bool:
        """Ping, and read until the pong (True) or close/timeout (False)."""
        try:
            async with asyncio.timeout(self._keepalive):
                await ws.ping()  # inside: a peer that stopped reading can block the send
                while True:
                    msg = await ws.receive()
                    if msg.type is _PONG:
                        return True
                    if msg.type is _PING:
                        await ws.pong(msg.data)
                    elif msg.type is not _BINARY and msg.type is not _TEXT:
                        return False
                    # Data before the first request is impossible; nothing to lose here.
        except (TimeoutError, ConnectionError):
            return False

    async def _keepalive_loop(self, ws: WebSocket) -> None:
        """Ping every ``keepalive`` s; close when a pong does not come within that time.

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
                self._log.warning("no pong within keepalive; closing", seconds=self._keepalive)
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

    async def _acquire_message_slot(self) -> None:
        """Wait for a slot of Upbit's per-connection message budget (5/s, 100/min).

        Paced by a token bucket in front of the windows, so a busy minute spreads its
        requests instead of spending them in 20 s and then sending nothing for 40 s.
        """
        limiter, pace = self._limiter, self._pace
        while True:
            now = time.monotonic()  # a wall-clock step must not stall or burst requests
            wait = max(limiter.delay(now), pace.delay(now))
            if wait <= 0.0 and limiter.try_acquire(now) and pace.try_acquire(now):
                return
            await asyncio.sleep(max(wait, 0.01))

    async def _sender(self, ws: WebSocket) -> None:
        while True:
            await self._changed.wait()
            await asyncio.sleep(self._coalesce)
            self._changed.clear()
            wanted = self._wanted
            if wanted in (self._sent, self._rejected):
                continue
            if not wanted:
                # Upbit has no unsubscribe: the only way to carry nothing is to close. A
                # new subscription often follows soon, so keep the connection (and the
                # streams, unpublished) for a while rather than spend connects on it.
                try:
                    await asyncio.wait_for(self._wanted_again(), self._idle_close)
                except TimeoutError:
                    await ws.close()
                    return
                continue
            target = self._target(wanted)
            if target == self._sent:
                self._retry_later(REMOVAL_RETRY)  # only removals, and budget is scarce
                continue
            await self._acquire_message_slot()
            wanted = self._wanted
            # Judged on the budget before this request, like the check above: counting
            # the slot just taken would make this request scarce when that one was not.
            target = self._target(wanted, spent=1)
            new = target - (self._sent or frozenset())
            # Widened streams get their snapshot too: the router keeps it unclaimed for
            # whoever subscribes next (DataRouter.claim).
            message = self._exchange.subscription_message(sorted(target, key=_sort_key), new)
            await ws.send_str(message)
            self.stats.requests_sent += 1
            self._widened = new - wanted
            if self._widened:
                self._log.info(
                    "requests are scarce: the request carries siblings ahead of demand",
                    widened=len(self._widened),
                    streams=len(target),
                )
            self._last_good = self._sent or frozenset()
            self._set_sent(target)
            self._sent_at = time.monotonic()
            self._log.debug("subscription sent", streams=len(wanted), new=len(new))
            if target != wanted:
                # Extras (released or widened) go once the budget allows: look again.
                self._retry_later(REMOVAL_RETRY)

    def _target(
        self, wanted: frozenset[UpstreamStream], *, spent: int = 0
    ) -> frozenset[UpstreamStream]:
        """What to request: ``wanted``, plus, while budget is scarce, released streams
        and the siblings of new ones (see SCARCE_HEADROOM). ``spent``: slots already
        taken for this very request, not counted against it."""
        headroom = self._limiter.headroom(time.monotonic()) + spent
        target = request_target(
            wanted,
            self._sent,
            headroom=headroom,
            min_headroom=SCARCE_HEADROOM,
            max_lingering=MAX_LINGERING,
        )
        if self._widen is not None and not self._widen_off and headroom < SCARCE_HEADROOM:
            target = self._widen(target, self._sent, MAX_LINGERING - len(target - wanted))
        return target

    async def _wanted_again(self) -> None:
        while not self._wanted:
            self._changed.clear()
            await self._changed.wait()
        self._changed.set()

    def _retry_later(self, delay: float) -> None:
        if self._retry is None or self._retry.done():
            self._retry = asyncio.ensure_future(self._wake_after(delay))

    async def _wake_after(self, delay: float) -> None:
        await asyncio.sleep(delay)
        self._changed.set()

    def _set_sent(self, streams: frozenset[UpstreamStream] | None) -> None:
        self._sent = streams
        if self._on_carried is not None:
            self._on_carried(streams or frozenset())

    async def _verifier(self, ws: WebSocket) -> None:
        """Ask Upbit what it serves now and then, and repair any difference."""
        while True:
            await asyncio.sleep(self._verify_interval)
            if self._sent is None or self._changed.is_set():
                continue
            await self._acquire_message_slot()
            await ws.send_str(self._exchange.list_subscriptions_message())
            self.stats.verifications += 1

    def _on_control_messages(self, messages: list[UpbitMessage]) -> None:
        for message in messages:
            if isinstance(message, UpbitError):
                self.on_upstream_error(str(message.error.name), message.error.message)
            elif isinstance(message, SubscriptionList):
                self._check_listing(message)

    def _check_listing(self, listing: SubscriptionList) -> None:
        intended = self._sent
        if intended is None or self._changed.is_set():
            return  # a new request is on its way; this listing is already stale
        missing, unexpected = self._exchange.compare_listing(intended, listing)
        if missing or unexpected:
            self.stats.mismatches += 1
            self._log.warning(
                "Upbit serves something else than requested; resending",
                missing=len(missing),
                unexpected=len(unexpected),
            )
            self._sent = None
            self._changed.set()

    def on_upstream_error(self, name: str, message: str) -> None:
        """Upbit rejected our last request: it keeps the previous one, and so do we."""
        self.stats.upstream_errors += 1
        self._log.error("Upbit rejected a request", error=name, message=message[:200])
        if self._sent is not None and time.monotonic() - self._sent_at < 10:
            rejected = self._sent
            self._rejected = rejected
            if self._widened:
                # The request was bigger than clients asked for: what they asked for has
                # not been refused, so ask again, plainly if the size may be the cause.
                self._rejected = None
                self._changed.set()
                if "too many" not in name.lower() and not self._widen_off:
                    self._widen_off = True
                    self._log.warning(
                        "Upbit refused a widened request; plain requests on this connection"
                    )
            self._set_sent(self._last_good)
            if self._on_rejected is not None:
                self._on_rejected(rejected - self._last_good)


def _sort_key(stream: UpstreamStream) -> tuple[str, str, int, float]:
    return (stream.type, stream.code or "", stream.depth or 0, stream.level or 0.0)
