"""A small kinematics simulator, projectile questions made from it, and the `kinematics` verifier.

The simulator integrates the equations of motion step by step (RK4) rather than using the closed
form, so that variants without one (drag) work the same way; tests check it against the closed form.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from functools import lru_cache

from lathe.verify.base import Verdict, register
from lathe.verify.tasks import Task, parse_prompt, task_generator

G = 9.81  # m/s^2


@dataclass(frozen=True)
class Flight:
    range_m: float
    flight_time_s: float
    max_height_m: float


def simulate(speed: float, angle_deg: float, g: float = G, drag: float = 0.0, dt: float = 0.005) -> Flight:
    """A projectile launched from the ground at `speed` m/s and `angle_deg` above the horizontal.

    drag is k in a = -k|v|v (per metre; 0 = vacuum). Steps until the projectile is back at height 0,
    then finds the landing instant by interpolating between the last two steps."""
    if speed <= 0 or not 0 < angle_deg <= 90:
        raise ValueError(f"need speed > 0 and 0 < angle <= 90 degrees, got {speed} m/s at {angle_deg} degrees")
    angle = math.radians(angle_deg)
    state = (0.0, 0.0, speed * math.cos(angle), speed * math.sin(angle))  # x, y, vx, vy
    t, top = 0.0, 0.0
    for _ in range(10_000_000):
        new = _rk4_step(state, dt, g, drag)
        if new[1] < 0:
            frac = state[1] / (state[1] - new[1])  # where between the two steps y crossed 0
            return Flight(state[0] + frac * (new[0] - state[0]), t + frac * dt, top)
        state, t, top = new, t + dt, max(top, new[1])
    raise RuntimeError("projectile did not land; dt too small for this flight")


def _derivative(state: tuple, g: float, drag: float) -> tuple:
    _, _, vx, vy = state
    speed = math.hypot(vx, vy)
    return (vx, vy, -drag * speed * vx, -g - drag * speed * vy)


def _rk4_step(state: tuple, dt: float, g: float, drag: float) -> tuple:
    def nudge(s, d, h):
        return tuple(a + h * b for a, b in zip(s, d))

    k1 = _derivative(state, g, drag)
    k2 = _derivative(nudge(state, k1, dt / 2), g, drag)
    k3 = _derivative(nudge(state, k2, dt / 2), g, drag)
    k4 = _derivative(nudge(state, k3, dt), g, drag)
    return tuple(s + dt / 6 * (a + 2 * b + 2 * c + d) for s, a, b, c, d in zip(state, k1, k2, k3, k4))


def closed_form_range(speed: float, angle_deg: float, g: float = G) -> float:
    return speed**2 * math.sin(2 * math.radians(angle_deg)) / g


# --- questions and the verifier ------------------------------------------------------------------

QUESTIONS = {
    "range": "How far away does it land, in meters?",
    "time": "How long is it in the air, in seconds?",
}
PROMPT = re.compile(
    r"A ball is thrown at ([\d.]+) m/s at ([\d.]+) degrees\. (How far away does it land, in meters\?"
    r"|How long is it in the air, in seconds\?)"
)
NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


@task_generator("kinematics")
def generate_kinematics(rng: random.Random, n: int, quantities: tuple[str, ...] = ("range", "time"),
                        speeds: tuple[int, int] = (5, 30), angles: tuple[int, int] = (15, 75)) -> list[Task]:
    """Whole-number speeds (m/s) and angles (degrees) within the given bounds."""
    tasks = []
    for _ in range(n):
        speed, angle, quantity = rng.randint(*speeds), rng.randint(*angles), rng.choice(quantities)
        prompt = f"A ball is thrown at {speed} m/s at {angle} degrees. {QUESTIONS[quantity]}"
        tasks.append(Task(prompt, f"{_expected(speed, angle, quantity):.2f}", "kinematics"))
    return tasks


@lru_cache(maxsize=4096)  # a reward function sees the same prompts again and again
def _expected(speed: float, angle: float, quantity: str) -> float:
    flight = simulate(speed, angle)
    return flight.range_m if quantity == "range" else flight.flight_time_s


@register("kinematics")
def verify_kinematics(prompt: str, answer: str, rel_tol: float = 0.02, **ctx) -> Verdict:
    """Right when the first number in the answer is within rel_tol of the simulated value."""
    match = parse_prompt(PROMPT, prompt, "kinematics")
    quantity, unit = ("range", "m") if match[3].startswith("How far") else ("time", "s")
    expected = float(ctx.get("expected", _expected(float(match[1]), float(match[2]), quantity)))
    found = NUMBER.search(answer)
    if found is None:
        return Verdict(0.0, f"expected {expected:.2f} {unit}, got no number")
    got = float(found[0])
    error = abs(got - expected) / abs(expected) if expected else abs(got)
    right = math.isclose(got, expected, rel_tol=rel_tol, abs_tol=1e-9)
    verdict = "within" if right else "over"
    reason = f"expected {expected:.2f} {unit}, got {found[0]} (off by {error:.1%}, {verdict} {rel_tol:.0%})"
    return Verdict(1.0 if right else 0.0, reason)
