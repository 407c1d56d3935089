"""Top half / bottom half with a workqueue: the Linux Kernel Module Programming Guide's
``bottomhalf.c``, with its two GPIO buttons and LED turned into emulated devices.

The interrupt handler (top half) does what must be done at once, in hard-IRQ context,
where it must not sleep: it sets the LED from the button that was pressed. The rest,
which takes a while and sleeps, it defers to a work item (bottom half) that a kworker
runs in process context. The C original::

    static void bottomhalf_work_fn(struct work_struct *work)
    {
            pr_info("Bottom half workqueue starts\\n");
            /* do something which takes a while */
            msleep(500);
            pr_info("Bottom half workqueue ends\\n");
    }

    static DECLARE_WORK(bottomhalf_work, bottomhalf_work_fn);

    static irqreturn_t button_isr(int irq, void *data)
    {
            /* Do something quickly right now */
            if (irq == button_irqs[0] && !gpio_get_value(buttons[0].gpio))
                    gpio_set_value(leds[0].gpio, 1);
            else if (irq == button_irqs[1] && !gpio_get_value(buttons[1].gpio))
                    gpio_set_value(leds[0].gpio, 0);

            /* Do the rest at leisure via the scheduler */
            schedule_work(&bottomhalf_work);
            return IRQ_HANDLED;
    }

Here the two buttons are IRQ lines (``kernel.add_irq_source()`` or
``emu.irq_inject_interrupt()`` press them), the LED is an ``emu.Atomic``, and the work
counts its runs: presses that come while the work is pending coalesce into one run.
"""

from __future__ import annotations

from dataclasses import dataclass

import emu


@dataclass
class Buttons:
    """The module's state: shared with the handler and the work (emu objects)."""

    irqs: tuple[int, int]
    led: emu.Atomic
    presses: emu.Atomic  # interrupts taken
    runs: emu.Atomic  # bottom halves run
    work: emu.Work | None = None


_dev: Buttons | None = None


def bottomhalf_work_fn(dev: Buttons, work: emu.Work) -> None:
    emu.pr_info("Bottom half workqueue starts")
    emu.msleep(dev_nap_ms)  # do something which takes a while (and sleeps)
    emu.atomic_inc(dev.runs)
    emu.pr_info("Bottom half workqueue ends")


#: How long the bottom half "works" (500 ms in the original).
dev_nap_ms = 50


def button_isr(irq: int, dev: Buttons) -> int:
    # Do something quickly right now
    emu.atomic_inc(dev.presses)
    emu.atomic_set(dev.led, 1 if irq == dev.irqs[0] else 0)
    # Do the rest at leisure via the scheduler
    assert dev.work is not None
    emu.schedule_work(dev.work)
    return emu.IRQ_HANDLED


def bottomhalf_init(irqs: tuple[int, int] = (6, 7)) -> int:
    """module_init: set up the work and request both button interrupts; 0 or -errno."""
    global _dev
    dev = Buttons(irqs, emu.Atomic(), emu.Atomic(), emu.Atomic())
    dev.work = emu.Work(lambda work: bottomhalf_work_fn(dev, work))
    for irq in irqs:
        ret = emu.request_irq(irq, button_isr, 0, "gpiomod#button", dev)
        if ret:
            emu.pr_err("Unable to request IRQ: %d", ret)
            if irq != irqs[0]:
                emu.free_irq(irqs[0], dev)
            return ret
    _dev = dev
    emu.pr_info("bottomhalf: buttons on IRQ %d and %d", *irqs)
    return 0


def bottomhalf_exit() -> Buttons:
    """module_exit: free the interrupts, then make sure no bottom half is left pending
    or running (flush first: a press that came last still gets its bottom half)."""
    global _dev
    dev = _dev
    assert dev is not None and dev.work is not None, "bottomhalf_exit() without init"
    for irq in dev.irqs:
        emu.free_irq(irq, dev)
    emu.flush_work(dev.work)
    emu.cancel_work_sync(dev.work)
    _dev = None
    return dev
