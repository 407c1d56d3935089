"""A kthread worker as a driver's message pump, in the shape of drivers/spi/spi.c.

The SPI core gives each controller a kthread worker that "pumps" its message queue:
spi_init_queue() creates the worker and the pump work, spi_async() queues a message
and kicks the pump, and spi_destroy_queue() flushes and destroys the worker::

    ctlr->kworker = kthread_create_worker(0, dev_name(&ctlr->dev));
    kthread_init_work(&ctlr->pump_messages, spi_pump_messages);
    ...
    kthread_queue_work(ctlr->kworker, &ctlr->pump_messages);   /* spi_async() */
    ...
    kthread_flush_worker(ctlr->kworker);                        /* spi_destroy_queue() */
    kthread_destroy_worker(ctlr->kworker);

Here a message is an int put into a shared ring (emu Atomics): the pump takes every
message queued so far, in order, "transfers" it (sums it), and runs again if more came
meanwhile. Kicking the pump while it is pending does nothing (kthread_queue_work()
returns False): one pump run serves every message queued before it starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import emu

RING = 64


@dataclass
class Controller:
    """struct spi_controller, as far as the pump goes (emu objects: shared)."""

    worker: emu.KthreadWorker
    pump: emu.KthreadWork | None = None
    ring: list[emu.Atomic] = field(default_factory=lambda: [emu.Atomic() for _ in range(RING)])
    head: emu.Atomic = field(default_factory=emu.Atomic)  # messages queued
    tail: emu.Atomic = field(default_factory=emu.Atomic)  # messages transferred
    total: emu.Atomic64 = field(default_factory=emu.Atomic64)  # what the transfers summed
    pumps: emu.Atomic = field(default_factory=emu.Atomic)  # pump runs


def spi_pump_messages(ctlr: Controller, work: emu.KthreadWork) -> None:
    """The pump: transfer every queued message, oldest first."""
    emu.atomic_inc(ctlr.pumps)
    while emu.atomic_read(ctlr.tail) != emu.atomic_read(ctlr.head):
        tail = emu.atomic_read(ctlr.tail)
        emu.atomic64_add(emu.atomic_read(ctlr.ring[tail % RING]), ctlr.total)
        emu.atomic_set(ctlr.tail, tail + 1)


def spi_init_queue(name: str, cpu: int | None = None) -> Controller:
    """Create the controller's worker (started) and its pump work."""
    if cpu is None:
        worker = emu.kthread_run_worker(0, "%s", name)
    else:
        worker = emu.kthread_run_worker_on_cpu(cpu, 0, name)
    ctlr = Controller(worker)
    ctlr.pump = emu.KthreadWork(lambda work: spi_pump_messages(ctlr, work))
    return ctlr


def spi_async(ctlr: Controller, message: int) -> bool:
    """Queue `message` and kick the pump; False if the ring is full (-EBUSY in C).
    One producer at a time, as under the controller's queue lock."""
    head = emu.atomic_read(ctlr.head)
    if head - emu.atomic_read(ctlr.tail) >= RING:
        return False
    emu.atomic_set(ctlr.ring[head % RING], message)
    emu.atomic_set(ctlr.head, head + 1)
    assert ctlr.pump is not None
    emu.kthread_queue_work(ctlr.worker, ctlr.pump)
    return True


def spi_destroy_queue(ctlr: Controller) -> None:
    """Let the pump finish what was queued, then stop and free the worker."""
    emu.kthread_flush_worker(ctlr.worker)
    emu.kthread_destroy_worker(ctlr.worker)
