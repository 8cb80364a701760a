"""The per-minute chart of the admin pages as plain numbers for an inline SVG: bars, axes,
tick labels. Drawn on the server, so it needs no script and no inline style."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

WIDTH, HEIGHT = 640, 200
LEFT, RIGHT, TOP, BOTTOM = 48, 12, 12, 40  # margins for the axes' ticks and labels
PLOT_W, PLOT_H = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM


@dataclass(frozen=True)
class Bar:
    x: float
    y: float
    height: float
    value: int
    label: str  # its <title>: "13:04 UTC: 12 completed"


@dataclass(frozen=True)
class Chart:
    """What the template draws: two bar series, y ticks (value, y) and x ticks (text, x)."""

    done: list[Bar]
    failed: list[Bar]
    y_ticks: list[tuple[int, float]]
    x_ticks: list[tuple[str, float]]
    bar_width: float
    total_done: int
    total_failed: int
    peak: int  # the most in one minute (0: nothing in the hour)


def _clock(minute: int) -> str:
    return datetime.fromtimestamp(minute * 60, UTC).strftime("%H:%M")


def minute_chart(minutes: list) -> Chart:
    """A chart of [minute (Unix minutes), completed, failed] rows, oldest first."""
    most = max([0, *(m[1] for m in minutes), *(m[2] for m in minutes)])
    peak = max(most, 1)  # the scale: an empty hour still has an axis from 0 to 1
    slot = PLOT_W / max(len(minutes), 1)
    width = round(slot * 0.42, 2)

    def bars(index: int, offset: float, word: str) -> list[Bar]:
        out = []
        for i, row in enumerate(minutes):
            value = row[index]
            if value:
                height = round(value / peak * PLOT_H, 2)
                out.append(Bar(round(LEFT + i * slot + offset, 2), round(TOP + PLOT_H - height, 2),
                               height, value, f"{_clock(row[0])} UTC: {value} {word}"))
        return out

    y_values = sorted({0, peak // 2, peak}) if peak > 1 else [0, 1]
    y_ticks = [(v, round(TOP + PLOT_H - v / peak * PLOT_H, 2)) for v in y_values]
    x_ticks = [(_clock(row[0]), round(LEFT + i * slot + slot / 2, 2))
               for i, row in enumerate(minutes) if i % 15 == 0 or i == len(minutes) - 1]
    return Chart(bars(1, slot * 0.06, "completed"), bars(2, slot * 0.52, "failed"), y_ticks,
                 x_ticks, width, sum(m[1] for m in minutes), sum(m[2] for m in minutes), most)


def combined(health: list[dict]) -> list[list[int]]:
    """Every lane's minutes added up, minute by minute (they share the same minutes)."""
    rows: dict[int, list[int]] = {}
    for lane in health:
        for minute, done, failed in lane["minutes"]:
            row = rows.setdefault(minute, [minute, 0, 0])
            row[1] += done
            row[2] += failed
    return [rows[m] for m in sorted(rows)]
