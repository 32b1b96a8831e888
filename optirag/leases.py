"""One writer per scoring run: a lease, an object created atomically next to the run.

Taking the lease creates the object only if there is none (an exclusive create on a local
disk, a conditional `If-None-Match: *` PUT on S3). It names its holder (host, pid, a random
id) and when it expires. A heartbeat thread renews it every third of its time to live by a
conditional replace (`If-Match` on the ETag on S3; a compare-and-swap under a file lock on a
local disk), so a second invocation of the same run sees a live lease and is refused,
naming the holder. A driver that was killed stops renewing: once its lease has expired the
next invocation takes it over (a conditional replace again, so of two invocations racing
for an expired lease one wins). A holder that finds its lease taken over stops and must not
commit (`check`). The lease is deleted when the run is done with it.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field

from optirag import storage
from optirag.config import StorageConfig

log = logging.getLogger(__name__)


class LeaseHeld(RuntimeError):
    """Another live invocation holds the lease."""


class LeaseLost(RuntimeError):
    """This invocation's lease was taken over by another one: it must not commit."""


_HELD: dict[str, Lease] = {}  # this process's leases: a run started twice here is one writer
_TAKING = threading.Lock()


@dataclass(eq=False)
class Lease:
    uri: str
    store: StorageConfig
    ttl_s: float
    owner: str
    version: str
    lost: bool = False
    _stop: threading.Event = field(default_factory=threading.Event)

    @classmethod
    def take(cls, uri: str, store: StorageConfig, ttl_s: float, what: str) -> Lease:
        """The lease at `uri` for `what` (named in errors), or LeaseHeld."""
        with _TAKING:
            held = _HELD.get(uri)
            if held is not None and not held.lost:
                return held
            owner = uuid.uuid4().hex
            version = storage.create_exclusive(uri, _body(owner, ttl_s), store)
            if version is None:
                version = _take_over(uri, store, ttl_s, what, owner)
            lease = cls(uri, store, ttl_s, owner, version)
            threading.Thread(target=lease._beat, name="optirag-lease", daemon=True).start()
            _HELD[uri] = lease
            return lease

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            self.renew()

    def renew(self) -> None:
        try:
            body = _body(self.owner, self.ttl_s)
            version = storage.replace_if_unchanged(self.uri, body, self.version, self.store)
        except OSError as err:  # storage unreachable for a beat: try again at the next one
            log.warning("lease %s: renewal failed (%s)", self.uri, err)
            return
        if version is None:
            self.lost = True
            self._stop.set()
            log.error("lease %s was taken over by another invocation; this one stops", self.uri)
        else:
            self.version = version

    def check(self) -> None:
        if self.lost:
            raise LeaseLost(f"{self.uri}: the run's lease was taken over; not committing")

    def release(self) -> None:
        self._stop.set()
        with _TAKING:
            if _HELD.get(self.uri) is self:
                del _HELD[self.uri]
        if self.lost:
            return
        found = storage.read_versioned(self.uri, self.store)
        if found is not None and found[1] == self.version:
            storage.delete_file(self.uri, self.store)


def _body(owner: str, ttl_s: float) -> bytes:
    holder = {
        "owner": owner,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "expires_at": time.time() + ttl_s,
    }
    return json.dumps(holder).encode()


def _take_over(uri: str, store: StorageConfig, ttl_s: float, what: str, owner: str) -> str:
    found = storage.read_versioned(uri, store)
    if found is None:  # released in between: create it again
        version = storage.create_exclusive(uri, _body(owner, ttl_s), store)
        if version is not None:
            return version
        found = storage.read_versioned(uri, store)
        if found is None:
            raise LeaseHeld(f"{what}: its lease {uri} keeps changing; try again")
    content, version = found
    holder = json.loads(content)
    until = dt.datetime.fromtimestamp(holder["expires_at"], dt.UTC).isoformat(timespec="seconds")
    if holder["expires_at"] > time.time():
        raise LeaseHeld(
            f"{what} is being written by another invocation (host {holder['host']}, pid "
            f"{holder['pid']}, lease {holder['owner'][:8]}, live until {until}); wait for it "
            f"or stop it: a lease expires {ttl_s:g} s after its holder's last renewal"
        )
    taken = storage.replace_if_unchanged(uri, _body(owner, ttl_s), version, store)
    if taken is None:
        raise LeaseHeld(f"{what}: another invocation took over its expired lease first")
    log.warning(
        "%s: took over the expired lease of host %s, pid %s (expired %s)",
        what,
        holder["host"],
        holder["pid"],
        until,
    )
    return taken
