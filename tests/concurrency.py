"""Jobs side by side, as sweep and tune workers start together on one machine."""

from __future__ import annotations

import threading
from typing import Any, Callable


def together(*jobs: Callable[[], Any]) -> list[Any]:
    """Run the jobs in threads released at one instant; their results in the jobs' order.

    A job's exception is raised here, after every thread has ended, so a failing job fails the test.
    """
    ready = threading.Barrier(len(jobs))
    results: list[Any] = [None] * len(jobs)
    errors: list[BaseException] = []

    def run(i: int, job: Callable[[], Any]) -> None:
        ready.wait()
        try:
            results[i] = job()
        except BaseException as exc:  # noqa: BLE001  (re-raised in the test's thread)
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i, job)) for i, job in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results
