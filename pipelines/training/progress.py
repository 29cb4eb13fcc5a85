"""The driver's progress bar for `train`: epochs done, the latest validation -ELBO, samples/s.

Ray Train v2 gives the driver no per-epoch callback, but rank 0 logs every epoch to the MLflow
run the driver created, so the driver follows that run: a daemon thread reads its history once
a second. The workers then print nothing per epoch: one bar on stderr instead of a line per
epoch forwarded through Ray's log monitor (with its prefixes and colour codes).
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Iterator

from tqdm.auto import tqdm

POLL_S = 1.0


class _Follower:
    def __init__(self, client, run_id: str, bar: tqdm) -> None:
        self.client, self.run_id, self.bar = client, run_id, bar
        self.skipped = 0

    def history(self, key: str) -> dict[int, float]:
        try:
            return {m.step: m.value for m in self.client.get_metric_history(self.run_id, key)}
        except Exception:  # noqa: BLE001 - a tracking blip must not stop training
            return {}

    def update(self) -> None:
        val = self.history("val_neg_elbo")
        if not val:  # Ray placing and starting the workers (tens of seconds): say so, and tick
            if self.bar.n == 0:
                self.bar.set_postfix_str("starting the Ray workers", refresh=True)
            return
        last = max(val)
        self.bar.update(len(val) - self.bar.n)
        postfix = {"val -ELBO": f"{val[last]:.3f}"}
        rate = self.history("train_samples_per_s").get(last)
        if rate:  # already all ranks together (the workers sum their counts)
            postfix["samples/s"] = f"{rate:,.0f}"
        skipped = int(sum(self.history("skipped_shards").values()))
        if skipped:
            postfix["corrupt shards skipped"] = str(skipped)
        self.bar.set_postfix(postfix, refresh=True)


@contextlib.contextmanager
def epoch_bar(client, run_id: str, epochs: int, enabled: bool) -> Iterator[None]:
    """Show the run's epochs while the block (Ray Train's fit) runs; nothing when disabled."""
    if not enabled:
        yield
        return
    bar = tqdm(total=epochs, desc="train", unit="epoch", file=sys.stderr, dynamic_ncols=True)
    follower = _Follower(client, run_id, bar)
    follower.update()  # a resumed run starts at its epochs done
    stop = threading.Event()

    def follow() -> None:
        while not stop.wait(POLL_S):
            follower.update()

    thread = threading.Thread(target=follow, name="vae-train-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)
        follower.update()
        bar.close()
