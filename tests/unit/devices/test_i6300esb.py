"""The 6300ESB watchdog model, driven with the accesses Linux's ``i6300esb`` driver makes
(``esb_initdevice``, ``esb_timer_set_heartbeat``, ``esb_timer_start``, ``esb_timer_keepalive``,
``esb_timer_stop``), with short preload values so that stages last milliseconds."""

from __future__ import annotations

import random
import threading
import time
from typing import Any

import pytest
from vmmkit_devices.legacy.i6300esb import (
    CONFIG_REG,
    LOCK_REG,
    RELOAD_REG,
    TIMER1_REG,
    TIMER2_REG,
    I6300Esb,
    stage_seconds,
)


class Harness:
    def __init__(self) -> None:
        self.resets: list[str] = []
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.reset_seen = threading.Event()
        self.device = I6300Esb("_wdt", reset_vm=self._reset, emit=lambda name, **p: self.events.append((name, p)))

    def _reset(self, reason: str) -> None:
        self.resets.append(reason)
        self.device.reset()  # what the machine's reset does to every device
        self.reset_seen.set()

    # Linux's accesses -------------------------------------------------------------------------

    def unlock(self) -> None:
        self.device.bar_write(0, RELOAD_REG, b"\x80")
        self.device.bar_write(0, RELOAD_REG, b"\x86")

    def init_device(self) -> int:
        """``esb_initdevice``: reboot on, 1 kHz, no interrupt; disabled; read and clear the
        timed-out flag. Returns the flag word it read."""
        self.device.config_write(CONFIG_REG, 2, 0x0003)
        self.device.config_write(LOCK_REG, 1, 0x00)
        self.unlock()
        flags = int.from_bytes(self.device.bar_read(0, RELOAD_REG, 2), "little")
        self.unlock()
        self.device.bar_write(0, RELOAD_REG, (0x11 << 8).to_bytes(2, "little"))
        return flags

    def set_preload(self, value: int) -> None:
        for register in (TIMER1_REG, TIMER2_REG):
            self.unlock()
            self.device.bar_write(0, register, value.to_bytes(4, "little"))

    def ping(self) -> None:
        self.unlock()
        self.device.bar_write(0, RELOAD_REG, (1 << 8).to_bytes(2, "little"))

    def start(self, lock: bool = False) -> None:
        self.device.config_write(LOCK_REG, 1, 0x02 | int(lock))

    def stop(self) -> None:
        self.ping()
        self.device.config_write(LOCK_REG, 1, 0x00)


@pytest.fixture
def esb() -> Any:
    harness = Harness()
    yield harness
    harness.device.close()


#: A preload whose stage lasts ~30 ms (1 kHz scale): two stages ~60 ms.
SHORT = 30


def test_identity_and_bar() -> None:
    device = I6300Esb("_wdt", reset_vm=lambda reason: None)
    assert device.config_read(0, 4) == 0x25AB_8086
    assert device.config_read(0x08, 4) >> 16 == 0x0880  # system peripheral, other
    assert device.config.bars[0].size == 16
    device.close()


def test_the_stage_length_follows_the_33_mhz_clock() -> None:
    assert stage_seconds(512, one_mhz=False) == pytest.approx(0.508, abs=0.001)  # Linux: 1 s = 2 stages
    assert stage_seconds(512, one_mhz=True) == pytest.approx(512 * 32 / 33e6)


def test_registers_read_back_what_the_driver_wrote(esb: Harness) -> None:
    assert esb.init_device() == 0
    assert esb.device.config_read(CONFIG_REG, 2) == 0x0003
    esb.start()
    assert esb.device.config_read(LOCK_REG, 1) == 0x02
    assert esb.device.config_read(0x64, 4) == esb.device.config.read(0x64, 4)  # not shadowed
    esb.stop()
    assert esb.device.config_read(LOCK_REG, 1) == 0x00


def test_a_guest_that_stops_petting_is_reset_and_its_driver_can_tell(esb: Harness) -> None:
    esb.init_device()
    esb.set_preload(SHORT)
    esb.start()
    for _ in range(5):  # petting in time keeps it alive
        time.sleep(stage_seconds(SHORT, one_mhz=False) / 2)
        esb.ping()
    assert not esb.resets
    assert esb.reset_seen.wait(5), "no reset after the petting stopped"
    assert esb.resets == ["watchdog"]
    assert esb.events == [("guest-watchdog-expired", {"id": "_wdt", "action": "reset"})]
    # After the reset, the registers are at power-on values and the timer is stopped...
    assert esb.device.config_read(LOCK_REG, 1) == 0 and not esb.device.enabled
    # ... but the timed-out flag survives for the next boot's driver (bit 9, and bit 12).
    assert esb.init_device() == 0x1200
    assert esb.init_device() == 0  # which cleared it
    assert esb.device.counters()["expirations"] == 1


def test_stopping_disarms_it(esb: Harness) -> None:
    esb.init_device()
    esb.set_preload(SHORT)
    esb.start()
    esb.stop()
    time.sleep(stage_seconds(SHORT, one_mhz=False) * 4)
    assert not esb.resets


def test_with_rebooting_off_nothing_is_reset_and_free_run_goes_on(esb: Harness) -> None:
    esb.device.config_write(CONFIG_REG, 2, 0x0020 | 0x3)  # bit 5: no reboot
    esb.set_preload(SHORT)
    esb.device.config_write(LOCK_REG, 1, 0x04 | 0x02)  # free-running, enabled
    time.sleep(stage_seconds(SHORT, one_mhz=False) * 7)
    assert not esb.resets
    assert esb.device.counters()["expirations"] >= 2  # it kept counting stage pairs


def test_the_lock_bit_holds_the_enable_until_reset(esb: Harness) -> None:
    esb.init_device()
    esb.start(lock=True)
    esb.device.config_write(LOCK_REG, 1, 0x00)  # ignored: locked ("nowayout")
    assert esb.device.enabled
    esb.device.reset()
    assert not esb.device.enabled


def test_writes_need_the_unlock_sequence_each_time(esb: Harness) -> None:
    esb.device.bar_write(0, TIMER1_REG, (5).to_bytes(4, "little"))  # not unlocked: ignored
    assert esb.device.preload[0] == 0xFFFFF
    esb.unlock()
    esb.device.bar_write(0, TIMER1_REG, (0xFFFF_FFFF).to_bytes(4, "little"))  # masked to 20 bits
    assert esb.device.preload[0] == 0xFFFFF
    esb.unlock()
    esb.device.bar_write(0, TIMER1_REG, (7).to_bytes(4, "little"))
    esb.device.bar_write(0, TIMER2_REG, (7).to_bytes(4, "little"))  # the unlock was used up
    assert esb.device.preload == [7, 0xFFFFF]
    esb.device.bar_write(0, RELOAD_REG, b"\x86")  # 0x86 without 0x80 does not unlock
    esb.device.bar_write(0, TIMER2_REG, (9).to_bytes(4, "little"))
    assert esb.device.preload[1] == 0xFFFFF


def test_hostile_accesses_are_harmless(esb: Harness) -> None:
    rng = random.Random(6300)
    for _ in range(20_000):
        index = rng.choice((0, 0, 1, 5, 6, -1))
        offset = rng.choice((rng.randrange(-4, 32), RELOAD_REG, TIMER1_REG))
        size = rng.choice((0, 1, 2, 4, 8, 9))
        if rng.random() < 0.5:
            data = rng.randbytes(size)
            esb.device.bar_write(index, offset, data)
        else:
            assert len(esb.device.bar_read(index, offset, size)) == max(0, min(size, 8))
        if rng.random() < 0.2:
            config_size = rng.choice((1, 2, 4))
            esb.device.config_write(rng.randrange(0x5C, 0x70), config_size, rng.getrandbits(32))
    assert esb.device.preload[0] <= 0xFFFFF and esb.device.preload[1] <= 0xFFFFF
    assert esb.device.config_reg <= 0x27 and esb.device.lock_reg <= 0x7
