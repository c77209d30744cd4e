"""The results: the environment, the targets, the markdown table, the JSON and the plot."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = (
    "fastapi",
    "starlette",
    "anyio",
    "pydantic",
    "fastapi-once",
    "fastapi-singleton",
    "async-lru",
    "uvicorn",
    "httpx",
    "matplotlib",
)
COMMAND = "python -m bench"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def version(package: str) -> str:
    """The installed version of ``package``, or ``not installed``."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return out.stdout.strip()


def _package_changes() -> list[str]:
    """Files of the package that differ from the commit (the bench measures the working tree)."""
    try:
        out = subprocess.run(
            ["git", "status", "--porcelain", "--", "fastapi_once"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return []
    return [line[3:] for line in out.stdout.splitlines()]


def environment(argv: list[str]) -> dict[str, Any]:
    """Where and with what the bench ran."""
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join([COMMAND, *argv]),
        "commit": _commit(),
        "uncommitted": _package_changes(),
        "machine": {
            "cores": os.cpu_count(),
            "cpu": _cpu_model(),
            "system": f"{platform.system()} {platform.release()}",
        },
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "executable": sys.executable,
        "packages": {name: version(name) for name in PACKAGES},
    }


# --- targets --------------------------------------------------------------------------------------


HOT_PATH_TARGET = 0.995
DRAIN_TARGET = 1.2
FAILURE_TARGET = 1.2


def _iqr(spread: dict[str, Any], fmt: str = ".3f") -> str:
    return f"{spread['median']:{fmt}} (IQR {spread['q1']:{fmt}}-{spread['q3']:{fmt}})"


def targets(scenarios: dict[str, Any]) -> list[dict[str, Any]]:
    """Check each of once's targets against what was measured."""
    found: list[dict[str, Any]] = []
    hot = scenarios.get("hot_path")
    if hot:
        control = hot["contenders"].get("baseline_again")
        for cid in ("once", "once_subdep"):
            c = hot["contenders"][cid]
            measured = (
                f"{c['ratio_to_baseline']:.3f} x (IQR {c['ratio_q1']:.3f}-{c['ratio_q3']:.3f}); "
                f"CPU {c['cpu_ratio_to_baseline']:.3f} x"
            )
            if control:
                measured += f"; control {control['ratio_to_baseline']:.3f} x"
            found.append(
                {
                    "target": f"hot path: {c['label']} >= {HOT_PATH_TARGET} x baseline",
                    "measured": measured,
                    "met": c["ratio_to_baseline"] >= HOT_PATH_TARGET,
                }
            )
    cold = scenarios.get("cold_burst")
    if cold:
        n = max(cold["callers"])
        once, event = cold["contenders"]["once"]["busy"], cold["contenders"]["event"]["busy"]
        over = once[str(n)]["drain_over_event"]
        found.append(
            {
                "target": f"cold burst, busy loop, N={n}: once drain <= {DRAIN_TARGET} x a bare "
                "asyncio.Event's",
                "measured": f"{_ms(once[str(n)]['drain_s'])} vs {_ms(event[str(n)]['drain_s'])}: "
                f"{_iqr(over, '.2f')} x",
                "met": over["median"] <= DRAIN_TARGET,
            }
        )
        lock = cold["contenders"]["lock_recipe"]["busy"]
        for n in cold["callers"]:
            ours, theirs = once[str(n)]["drain_s"], lock[str(n)]["drain_s"]
            found.append(
                {
                    "target": f"cold burst, busy loop, N={n}: once drain <= 1/20 of lock recipe's",
                    "measured": f"{_ms(ours)} vs {_ms(theirs)} (1/{theirs / ours:.0f})",
                    "met": ours * 20 <= theirs,
                }
            )
    failure = scenarios.get("failure_burst")
    if failure:
        once = failure["contenders"]["once"]
        found.append(
            {
                "target": "failure burst: once makes 1 attempt",
                "measured": f"{once['attempts']:g} attempt(s)",
                "met": once["attempts"] == 1,
            }
        )
        over = once["last_error_over_attempt_spread"]
        found.append(
            {
                "target": f"failure burst: last error within {FAILURE_TARGET} x the attempt time",
                "measured": f"{_iqr(over, '.2f')} x, max {over['max']:.2f} x",
                "met": over["median"] <= FAILURE_TARGET,
            }
        )
    keyed = scenarios.get("keyed")
    if keyed:
        c = keyed["contenders"]
        miss, hit = keyed["once_over_alru"]["miss"], keyed["once_over_alru"]["hit"]
        found.append(
            {
                "target": "keyed miss: once's CPU per call <= async-lru's",
                "measured": f"{_us(c['once_miss']['ns_per_call'])} vs "
                f"{_us(c['alru_miss']['ns_per_call'])}: {_iqr(miss, '.2f')} x",
                "met": miss["median"] <= 1.0,
            }
        )
        found.append(
            {
                "target": "keyed hit: once's CPU per call < async-lru's",
                "measured": f"{_us(c['once_hit']['ns_per_call'])} vs "
                f"{_us(c['alru_hit']['ns_per_call'])}: {_iqr(hit, '.2f')} x",
                "met": hit["median"] < 1.0,
            }
        )
    memory = scenarios.get("memory")
    if memory:
        once = memory["contenders"]["once"]
        found.append(
            {
                "target": f"memory: keyed once keeps <= maxsize={once['maxsize']} values",
                "measured": f"{once['values_kept']} kept of {once['keys']:,} keys, "
                f"RSS {_mib(once['rss_before_kib'])} -> {_mib(once['rss_after_kib'])}",
                "met": once["values_kept"] <= once["maxsize"],
            }
        )
    imports = scenarios.get("import_time")
    if imports:
        added = imports["added_wall_s"]
        inside = imports["in_process_fastapi_once_added_s"]
        found.append(
            {
                "target": "import: fastapi_once adds < 50 ms to FastAPI's own import",
                "measured": f"{_ms(added)} (timed in-process: {_ms(inside)})",
                "met": added < 0.050,
            }
        )
    return found


# --- markdown -------------------------------------------------------------------------------------


def _ms(seconds: float) -> str:
    ms = seconds * 1000
    return f"{ms:.1f} ms" if ms < 100 else f"{ms:,.0f} ms"


def _us(ns: float) -> str:
    return f"{ns / 1000:.2f} us"


def _mib(kib: float) -> str:
    return f"{kib / 1024:.1f} MiB"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return [*lines, ""]


def markdown(results: dict[str, Any]) -> str:
    """The results as a markdown document: environment, targets, then one table per scenario."""
    env, scenarios = results["environment"], results["scenarios"]
    packages = ", ".join(f"{name} {version}" for name, version in env["packages"].items())
    lines = [
        "# fastapi_once benchmarks",
        "",
        f"- Date: {env['date']} (commit {env['commit']}"
        + (
            f", with uncommitted changes to {', '.join(env['uncommitted'])})"
            if env.get("uncommitted")
            else ")"
        ),
        f"- Machine: {env['machine']['cores']} cores, {env['machine']['cpu']}, "
        f"{env['machine']['system']}",
        f"- Python: {env['python']}",
        f"- Packages: {packages}",
        f"- Command: `{env['command']}`"
        + (" (smoke: tiny sizes, numbers meaningless)" if results["config"]["smoke"] else ""),
        "",
        "Every scenario runs all its contenders in the same process run, interleaved over several "
        "rounds; numbers are medians over rounds, and ratios are taken within a round.",
        "",
        "## Targets",
        "",
    ]
    lines += _table(
        ["target", "measured", "met"],
        [[t["target"], t["measured"], "yes" if t["met"] else "**no**"] for t in results["targets"]],
    )
    hot = scenarios.get("hot_path")
    if hot:
        lines += [
            "## 1. Warm hot path through FastAPI",
            "",
            f"`GET /` called as an in-process ASGI app, {hot['rounds']} rounds x "
            f"{hot['requests_per_round']:,} requests per contender, round-robin. Ratio: median of "
            "the per-round ratios to the baseline (interquartile range in brackets). CPU ratio: "
            "the same with the process's CPU time instead of wall time, which other processes "
            "on a shared machine disturb less. The control is a second copy of the baseline: "
            "how far its ratio is from 1 is how far the harness resolves.",
            "",
        ]
        lines += _table(
            ["dependency", "requests/s", "us/request", "ratio to baseline", "CPU ratio"],
            [
                [
                    c["label"],
                    f"{c['rps_median']:,.0f}",
                    f"{c['us_per_request']:.1f}",
                    f"{c['ratio_to_baseline']:.3f} ({c['ratio_q1']:.3f}-{c['ratio_q3']:.3f})",
                    f"{c['cpu_ratio_to_baseline']:.3f} "
                    f"({c['cpu_ratio_q1']:.3f}-{c['cpu_ratio_q3']:.3f})",
                ]
                for c in hot["contenders"].values()
            ],
        )
    cold = scenarios.get("cold_burst")
    if cold:
        lines += [
            "## 2. Cold burst",
            "",
            f"N concurrent first calls; `fn` sleeps {cold['fn_sleep_s'] * 1000:.0f} ms. Busy loop: "
            f"{cold['busy_tasks']} other tasks looping `await asyncio.sleep(0)`. Drain: from `fn` "
            f"returning to the last caller resuming. Median of {cold['rounds']} rounds; busy drain "
            "/ Event: the median of each round's ratio to the bare `asyncio.Event`'s drain (IQR).",
            "",
        ]
        rows = []
        for c in cold["contenders"].values():
            for n in cold["callers"]:
                idle, busy = c["idle"][str(n)], c["busy"][str(n)]
                rows.append(
                    [
                        c["label"],
                        f"{n:,}",
                        f"{idle['runs']:g}",
                        _ms(idle["total_s"]),
                        _ms(idle["drain_s"]),
                        f"{busy['runs']:g}",
                        _ms(busy["total_s"]),
                        _ms(busy["drain_s"]),
                        f"{busy['drain_over_event']['median']:.2f} "
                        f"({busy['drain_over_event']['q1']:.2f}-"
                        f"{busy['drain_over_event']['q3']:.2f})",
                    ]
                )
        lines += _table(
            [
                "contender",
                "N",
                "idle: runs of fn",
                "idle: total",
                "idle: drain",
                "busy: runs of fn",
                "busy: total",
                "busy: drain",
                "busy: drain / Event",
            ],
            rows,
        )
    failure = scenarios.get("failure_burst")
    if failure:
        lines += [
            "## 3. Failure burst",
            "",
            f"{failure['callers']} concurrent callers; `fn` fails after "
            f"{failure['fn_fails_after_s'] * 1000:.0f} ms. Median of {failure['rounds']} rounds; "
            "ratio: last error over the attempt, per round (range in brackets).",
            "",
        ]
        lines += _table(
            ["contender", "attempts", "one attempt", "last caller has its error", "ratio"],
            [
                [
                    c["label"],
                    f"{c['attempts']:g}",
                    _ms(c["attempt_s"]),
                    _ms(c["last_error_s"]),
                    f"{c['last_error_over_attempt_spread']['median']:.2f} x "
                    f"({c['last_error_over_attempt_spread']['min']:.2f}-"
                    f"{c['last_error_over_attempt_spread']['max']:.2f})",
                ]
                for c in failure["contenders"].values()
            ],
        )
    http = scenarios.get("real_http")
    if http:
        lines += [
            "## 4. Real HTTP",
            "",
            f"{http['server']}; load: {http['loadgen']}, {http['connections']} connections, "
            f"{http['rounds']} alternating rounds of {http['seconds_per_round']:g} s per route; "
            f"{http['errors']} errors. Ratio: median of the per-round ratios. Server CPU ratio: "
            "requests per CPU-second of the uvicorn process, relative to the baseline's.",
            "",
        ]
        if http["note"]:
            lines += [f"Note: {http['note']}.", ""]
        lines += _table(
            ["dependency", "requests/s", "ratio to baseline", "server CPU ratio"],
            [
                [
                    c["label"],
                    f"{c['rps_median']:,.0f}",
                    f"{c['ratio_to_baseline']:.3f}",
                    "n/a"
                    if c["cpu_ratio_to_baseline"] is None
                    else f"{c['cpu_ratio_to_baseline']:.3f}",
                ]
                for c in http["contenders"].values()
            ],
        )
    memory = scenarios.get("memory")
    if memory:
        lines += [
            "## 5. Memory",
            "",
            f"{memory['keys']:,} distinct keys, one `await` each, {memory['value_bytes']}-byte "
            "values; each store in its own process. Growth: RSS at the end minus RSS after the "
            "first tenth of the keys.",
            "",
        ]
        rows = []
        for c in memory["contenders"].values():
            first = c["checkpoints"][0][1] if c["checkpoints"] else c["rss_before_kib"]
            rows.append(
                [
                    c["label"],
                    f"{c['values_kept']:,}",
                    _mib(c["rss_before_kib"]),
                    _mib(c["rss_after_kib"]),
                    _mib(c["rss_after_kib"] - first),
                    f"{c['seconds']:.1f} s",
                ]
            )
        lines += _table(["store", "values kept", "RSS before", "RSS after", "growth", "time"], rows)
    keyed = scenarios.get("keyed")
    if keyed:
        lines += [
            "## 6. Keyed once against async-lru: CPU time per call",
            "",
            f"`await f(k)` on `once(fn, key=lambda k: k, maxsize={keyed['maxsize']:,})` and "
            f"`alru_cache(maxsize={keyed['maxsize']:,})(fn)`, the same `fn`; a miss asks for a "
            "new key of a full cache (it makes a value and evicts one), a hit for a key the cache "
            f"holds. Process CPU time over {keyed['calls_per_round']:,} calls, {keyed['rounds']} "
            "rotated rounds; median and IQR per call. Ratio: the median of each round's once / "
            "async-lru.",
            "",
        ]
        ratios = keyed["once_over_alru"]
        lines += _table(
            ["contender", "CPU per call", "IQR", "once / async-lru"],
            [
                [
                    c["label"],
                    _us(c["ns_per_call"]),
                    f"{_us(c['ns_spread']['q1'])}-{_us(c['ns_spread']['q3'])}",
                    _iqr(ratios[c["kind"]], ".2f") if cid.startswith("once") else "",
                ]
                for cid, c in keyed["contenders"].items()
            ],
        )
    imports = scenarios.get("import_time")
    if imports:
        walls = imports["process_wall_s"]
        lines += [
            "## Import time",
            "",
            f"Fresh `python -c` processes, {imports['runs']} interleaved runs each, medians.",
            "",
        ]
        lines += _table(
            ["command", "process wall time"],
            [
                ["`import fastapi`", _ms(walls["fastapi"])],
                ["`import fastapi, fastapi_once`", _ms(walls["fastapi_once"])],
                ["added by fastapi_once", _ms(imports["added_wall_s"])],
                [
                    "added, timed inside one process after `import fastapi`",
                    _ms(imports["in_process_fastapi_once_added_s"]),
                ],
            ],
        )
    return "\n".join(lines)


# --- plot -----------------------------------------------------------------------------------------


def plot(results: dict[str, Any], path: Path) -> None:
    """Draw the hot path, the busy-loop drain, failure bursts, memory and keyed calls into a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    scenarios = results["scenarios"]
    fig, axes = plt.subplots(3, 2, figsize=(18, 16))
    (ax_hot, ax_drain), (ax_fail, ax_mem), (ax_keyed, ax_ratio) = axes

    hot = scenarios.get("hot_path")
    if hot:
        labels = [c["label"] for c in hot["contenders"].values()]
        ratios = [c["ratio_to_baseline"] for c in hot["contenders"].values()]
        colors = [
            "tab:green" if cid.startswith("once") else "tab:gray" for cid in hot["contenders"]
        ]
        spread = [
            [r - c["ratio_q1"] for r, c in zip(ratios, hot["contenders"].values(), strict=True)],
            [c["ratio_q3"] - r for r, c in zip(ratios, hot["contenders"].values(), strict=True)],
        ]
        ax_hot.barh(labels, ratios, xerr=spread, color=colors, capsize=3)
        ax_hot.axvline(1.0, color="black", linewidth=1)
        ax_hot.axvline(
            HOT_PATH_TARGET,
            color="tab:red",
            linestyle="--",
            linewidth=1,
            label=f"target {HOT_PATH_TARGET}",
        )
        ax_hot.invert_yaxis()
        ax_hot.set_xlabel("throughput / baseline (median of per-round ratios, IQR)")
        ax_hot.set_title("(a) warm hot path, in-process ASGI")
        ax_hot.legend(loc="lower right")
        for y, (ratio, c) in enumerate(zip(ratios, hot["contenders"].values(), strict=True)):
            ax_hot.text(c["ratio_q3"] + 0.01, y, f" {ratio:.3f}", va="center", fontsize=8)
        ax_hot.set_xlim(0, max(c["ratio_q3"] for c in hot["contenders"].values()) + 0.15)

    cold = scenarios.get("cold_burst")
    if cold:
        for cid, c in cold["contenders"].items():
            ns = cold["callers"]
            drains = [max(c["busy"][str(n)]["drain_s"], 1e-6) * 1000 for n in ns]
            ax_drain.plot(
                ns,
                drains,
                marker="o",
                label=c["label"],
                linewidth=3 if cid == "once" else 1.5,
                linestyle=":" if cid == "event" else "-",
            )
        ax_drain.set_xscale("log")
        ax_drain.set_yscale("log")
        ax_drain.set_xlabel("concurrent callers N")
        ax_drain.set_ylabel("drain time (ms, log)")
        ax_drain.set_title(f"(b) cold burst on a busy loop ({cold['busy_tasks']} spinning tasks)")
        ax_drain.legend()

    failure = scenarios.get("failure_burst")
    if failure:
        labels = [c["label"] for c in failure["contenders"].values()]
        last = [c["last_error_s"] * 1000 for c in failure["contenders"].values()]
        ax_fail.barh(labels, last, color="tab:orange")
        ax_fail.invert_yaxis()
        ax_fail.set_xscale("log")
        ax_fail.set_xlim(right=max(last) * 8)
        ax_fail.set_xlabel("time until the last caller has its error (ms, log)")
        ax_fail.set_title(
            f"(c) failure burst, {failure['callers']} callers, fn fails after "
            f"{failure['fn_fails_after_s'] * 1000:.0f} ms"
        )
        for y, c in enumerate(failure["contenders"].values()):
            attempts = f"{c['attempts']:g} attempt" + ("" if c["attempts"] == 1 else "s")
            ax_fail.text(last[y], y, f" {attempts}", va="center", fontsize=8)

    memory = scenarios.get("memory")
    if memory:
        for c in memory["contenders"].values():
            keys = [k for k, _ in c["checkpoints"]]
            rss = [kib / 1024 for _, kib in c["checkpoints"]]
            ax_mem.plot(keys, rss, marker="o", label=c["label"])
        ax_mem.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:,.0f}"))
        ax_mem.set_xlabel("distinct keys requested")
        ax_mem.set_ylabel("RSS (MiB)")
        ax_mem.set_title("(d) memory with distinct keys")
        ax_mem.legend()

    keyed = scenarios.get("keyed")
    if keyed:
        cs = list(keyed["contenders"].values())
        us = [c["ns_per_call"] / 1000 for c in cs]
        err = [
            [(c["ns_per_call"] - c["ns_spread"]["q1"]) / 1000 for c in cs],
            [(c["ns_spread"]["q3"] - c["ns_per_call"]) / 1000 for c in cs],
        ]
        colors = [
            "tab:green" if cid.startswith("once") else "tab:gray" for cid in keyed["contenders"]
        ]
        ax_keyed.barh([c["label"] for c in cs], us, xerr=err, color=colors, capsize=3)
        ax_keyed.invert_yaxis()
        ax_keyed.set_xscale("log")
        ax_keyed.set_xlim(right=max(us) * 8)
        ax_keyed.set_xlabel("process CPU time per call (us, log; median, IQR)")
        ax_keyed.set_title(f"(e) keyed calls, maxsize={keyed['maxsize']:,}")
        for y, (value, c) in enumerate(zip(us, cs, strict=True)):
            ax_keyed.text(
                c["ns_spread"]["q3"] / 1000, y, f"  {value:.2f} us", va="center", fontsize=8
            )

    # (f) every target measured as a ratio, against its limit
    bars: list[tuple[str, dict[str, Any], float]] = []
    if hot:
        for cid in ("once", "once_subdep"):
            c = hot["contenders"][cid]
            spread = {"median": c["ratio_to_baseline"], "q1": c["ratio_q1"], "q3": c["ratio_q3"]}
            # Drawn as time per request over the baseline's: 1 / the throughput ratio.
            inverted = {k: 1 / v for k, v in spread.items()}
            inverted["q1"], inverted["q3"] = inverted["q3"], inverted["q1"]
            bars.append((f"hot path: {c['label']} / baseline, time", inverted, 1 / HOT_PATH_TARGET))
    if cold:
        n = max(cold["callers"])
        over = cold["contenders"]["once"]["busy"][str(n)]["drain_over_event"]
        bars.append((f"drain, N={n:,}: once / Event", over, DRAIN_TARGET))
    if failure:
        over = failure["contenders"]["once"]["last_error_over_attempt_spread"]
        bars.append(("failure: last error / attempt", over, FAILURE_TARGET))
    if keyed:
        for kind in ("miss", "hit"):
            bars.append((f"keyed {kind}: once / async-lru", keyed["once_over_alru"][kind], 1.0))
    if bars:
        values = [b[1]["median"] for b in bars]
        err = [
            [b[1]["median"] - b[1]["q1"] for b in bars],
            [b[1]["q3"] - b[1]["median"] for b in bars],
        ]
        ax_ratio.barh([b[0] for b in bars], values, xerr=err, color="tab:green", capsize=3)
        for y, (_, spread, limit) in enumerate(bars):
            ax_ratio.plot([limit, limit], [y - 0.4, y + 0.4], color="tab:red", linewidth=2)
            ax_ratio.text(spread["q3"], y, f"  {spread['median']:.3f}", va="center", fontsize=8)
        ax_ratio.set_xlim(0, max(b[1]["q3"] for b in bars) * 1.15)
        ax_ratio.invert_yaxis()
        ax_ratio.set_xlabel("ratio (median, IQR); red: the target's limit, lower is better")
        ax_ratio.set_title("(f) the targets as ratios")

    fig.suptitle(
        f"fastapi_once benchmarks - {results['environment']['machine']['cpu']}, "
        f"{results['environment']['python']}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
