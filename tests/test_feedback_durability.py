"""kill -9 of a real `rlhfkit serve` right after acknowledged votes loses none of them."""

import concurrent.futures
import os
import re
import signal
import subprocess
import sys
import threading

import grpc

from rlhfkit.clients import Client
from rlhfkit.server.feedback import FeedbackStore


def start_server(policy_dir, db):
    proc = subprocess.Popen([sys.executable, "-m", "rlhfkit.clients.cli", "serve", "--policy", str(policy_dir),
                             "--port", "0", "--device", "cpu", "--feedback-db", f"sqlite:///{db}",
                             "--reload-interval", "0", "--log-level", "WARNING"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline()
    port = re.search(r"gRPC on [\d.]+:(\d+)", line)
    assert port, f"no port in {line!r}"
    return proc, f"127.0.0.1:{port.group(1)}"


def test_acknowledged_votes_survive_kill_9(tmp_path, tiny_policy_dir):
    db = tmp_path / "feedback.db"
    proc, address = start_server(tiny_policy_dir, db)
    acked, lock, stop = {}, threading.Lock(), threading.Event()
    try:
        with Client(address, timeout=60) as c:
            c.wait_ready()
            ids = [c.create_comparison(f"prompt {i}", samples_of="policy", temperature=1.0, max_new_tokens=2)
                   .comparison_id for i in range(4)]

            def voter(worker):
                # Vote until the server dies; remember every vote it acknowledged.
                for n in range(10_000):
                    if stop.is_set():
                        return
                    cid, annotator = ids[n % len(ids)], f"w{worker}-{n // len(ids)}"
                    choice = ("left", "right", "tie", "both_bad")[(n + worker) % 4]
                    try:
                        v = c.submit_vote(cid, choice, annotator, timeout=10)
                    except grpc.RpcError:
                        return  # the server is gone
                    with lock:
                        acked[v.vote_id] = (cid, annotator, choice)
                        if len(acked) >= 60:
                            stop.set()

            with concurrent.futures.ThreadPoolExecutor(4) as pool:
                futures = [pool.submit(voter, w) for w in range(4)]
                stop.wait(120)
                os.kill(proc.pid, signal.SIGKILL)  # no shutdown, no flush: right after the acks, mid-stream
                for f in futures:
                    f.result()
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL and len(acked) >= 60

    # Every acknowledged vote is in the store, read directly ...
    store = FeedbackStore(f"sqlite:///{db}")
    stored = {r["vote_id"]: (r["comparison_id"], r["annotator_id"], r["choice"]) for r in store.voted_comparisons()}
    store.close()
    missing = {v for v in acked if stored.get(v) != acked[v]}
    assert not missing, f"{len(missing)} of {len(acked)} acknowledged votes lost"

    # ... and a restarted server knows them: the same vote again is the recorded one.
    proc, address = start_server(tiny_policy_dir, db)
    try:
        with Client(address, timeout=60) as c:
            c.wait_ready()
            assert c.leaderboard(bootstrap_rounds=1).num_votes == len(stored) >= len(acked)
            vote_id, (cid, annotator, choice) = next(iter(acked.items()))
            again = c.submit_vote(cid, choice, annotator)
            assert again.already_recorded and again.vote_id == vote_id
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
