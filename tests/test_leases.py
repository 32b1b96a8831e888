"""One writer per run: the lease (optirag.leases) on a local disk and on S3 (moto's server,
which honours conditional writes)."""

import time

import pytest

from optirag import leases, storage


@pytest.fixture(autouse=True)
def _fresh_process_state():
    """Each test plays several processes: none holds another's lease."""
    leases._HELD.clear()
    yield
    for lease in list(leases._HELD.values()):
        lease.release()


@pytest.mark.parametrize("store_fixture", ["local_storage", "s3_storage"])
def test_a_live_lease_refuses_a_second_writer_and_an_expired_one_is_taken_over(
    store_fixture, request
):
    store = request.getfixturevalue(store_fixture)
    TTL = 1.8  # seconds: 0.6 expired through moto's server on a loaded 2-core machine
    uri = storage.join(store.root, "scores", "r1", "_lease.json")
    first = leases.Lease.take(uri, store, TTL, "run r1")
    assert leases.Lease.take(uri, store, TTL, "run r1") is first  # this process: re-entrant
    leases._HELD.clear()  # another process
    with pytest.raises(leases.LeaseHeld, match=r"run r1 is being written by .*host .*pid"):
        leases.Lease.take(uri, store, TTL, "run r1")
    time.sleep(TTL * 5 / 6)  # renewed by its heartbeat: still live past its first expiry
    with pytest.raises(leases.LeaseHeld):
        leases.Lease.take(uri, store, TTL, "run r1")

    first._stop.set()  # its driver killed: no more renewals
    time.sleep(TTL * 4 / 3)
    second = leases.Lease.take(uri, store, TTL, "run r1")  # the expired lease, taken over
    first.renew()  # the old holder wakes up: its lease is gone, it must not commit
    assert first.lost
    with pytest.raises(leases.LeaseLost):
        first.check()
    second.check()
    second.release()
    assert storage.read_versioned(uri, store) is None
    first.release()  # lost: deletes nothing


def test_a_second_invocation_of_a_run_is_refused_naming_the_holder(local_storage):
    from optirag import runs
    from tests.test_runs import _cfg, _start_inputs

    folder = storage.join(local_storage.root, "cands")
    _start_inputs(local_storage, folder)
    cfg = _cfg(local_storage, candidates_uri=folder)
    run = runs.start(cfg, "v1")
    leases._HELD.clear()  # another process
    with pytest.raises(runs.RunRefused, match="being written by another invocation"):
        runs.start(cfg, "v1")
    run.release()
    assert runs.start(cfg, "v1").paths.name == run.paths.name  # released: resumed
