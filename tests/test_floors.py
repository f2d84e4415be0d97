"""The declared dependency floors are the versions CI's minimum environment installs (`.ci/minimum.txt`)."""

import configparser
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
UNTESTED = {"torch"}  # CI installs the CPU build torch==2.13.0 in both environments (see .ci/minimum.txt)


def declared_floors() -> dict[str, Version]:
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg", encoding="utf-8")
    floors = {}
    for line in config["options"]["install_requires"].split("\n"):
        if line.strip():
            requirement = Requirement(line)
            (specifier,) = requirement.specifier  # one `>=` floor per dependency, nothing else
            assert specifier.operator == ">=", line
            floors[requirement.name.lower()] = Version(specifier.version)
    return floors


def minimum_pins() -> dict[str, Version]:
    pins = {}
    for line in (ROOT / ".ci" / "minimum.txt").read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            requirement = Requirement(line)
            (specifier,) = requirement.specifier
            assert specifier.operator == "==", line
            pins[requirement.name.lower()] = Version(specifier.version)
    return pins


def pin_is_floor(pin: Version, floor: Version) -> bool:
    """The pin is the floor itself, or a release of it (the floor 4.8 of opencv is pinned as 4.8.0.76)."""
    return pin.release[: len(floor.release)] == floor.release


def test_pin_is_floor():
    assert pin_is_floor(Version("4.8.0.76"), Version("4.8"))
    assert pin_is_floor(Version("0.30.0"), Version("0.30"))
    assert not pin_is_floor(Version("0.31.0"), Version("0.30"))
    assert not pin_is_floor(Version("9.20.0"), Version("9.2"))


def test_every_declared_floor_is_pinned_in_the_minimum_environment():
    floors, pins = declared_floors(), minimum_pins()
    assert {"torch", "diffusers", "transformers", "accelerate"} <= set(floors)
    assert set(pins) == set(floors) - UNTESTED
    for name, pin in pins.items():
        assert pin_is_floor(pin, floors[name]), (name, str(floors[name]), str(pin))
