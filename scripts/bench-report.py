#!/usr/bin/env python3
"""Tables of scripts/bench.sh's comparison parts, from loadgen's JSON reports.

  bench-report.py compare --out DIR --runs N --steal-max S --name NAME \
      --series KEY=LABEL ... --ratio NUM/DEN ...
      Each run's throughput of each series (DIR/KEY-RUN.json) and each ratio NUM/DEN of two
      series' throughputs, then the medians over the runs whose steal was at most S (all runs,
      with a warning, when none was); written to DIR/NAME.json too. Where bench.sh sampled the
      server's CPU over a run (DIR/KEY-RUN.cpu, see its sample_cpu), the server's CPU per
      request too, and each ratio's NUM/DEN of it: a steadier measure of what a server costs
      than its throughput on a shared machine.

  bench-report.py sweep --out DIR --max RATE --steps "10 20 ..." --steal-max S \
      --redis-label LABEL
      The latency-throughput sweep: settlegate (DIR/sweep-sg-PCT.json) and Redis
      (DIR/sweep-redis-PCT.json) at each PCT of RATE; writes DIR/sweep.json, DIR/sweep.txt and
      DIR/sweep.html (p50, p99, p99.9 against the rate, both servers) and prints the table and
      the verdict on the goal: settlegate's p99 <= Redis's at every step, and <= 1 ms up to the
      highest rate at which Redis holds p99 <= 1 ms.

Latencies are loadgen's corrected ones (from when each request was due), in microseconds.
"""

import argparse
import html
import json
import math
import statistics
import sys

# The goal's latency bound, in microseconds.
P99_GOAL_US = 1000
# A server kept up with a sweep step when it answered at least this share of the requests due,
# with no errors: otherwise its percentiles describe only what it was sent.
KEPT_UP_SHARE = 0.99


def load(path):
    with open(path) as f:
        return json.load(f)


def steal(report):
    return (report.get("host") or {}).get("steal_percent", 0.0)


def cpu_us(out, key, run, throughput):
    """The server's CPU per request over the run's sampled window, in microseconds, or None
    where it was not sampled."""
    try:
        with open(f"{out}/{key}-{run}.cpu") as f:
            t0, t1, window, tck = (float(x) for x in f.read().split())
    except (OSError, ValueError):
        return None
    return (t1 - t0) / tck / window / throughput * 1e6 if throughput and window else None


def compare(args):
    series = [s.split("=", 1) for s in args.series]
    labels = dict(series)
    ratios = [r.split("/", 1) for r in args.ratio]
    runs = []
    for run in range(1, args.runs + 1):
        reports = {key: load(f"{args.out}/{key}-{run}.json") for key, _ in series}
        quiet = all(steal(r) <= args.steal_max for r in reports.values())
        tp = {key: r["throughput_per_s"] for key, r in reports.items()}
        runs.append({"run": run, "counted": quiet, "throughput_per_s": tp,
                     "errors": {key: r["errors"] for key, r in reports.items()},
                     "steal_percent": {key: steal(r) for key, r in reports.items()},
                     "ratios": {f"{n}/{d}": tp[n] / tp[d] if tp[d] else None for n, d in ratios},
                     "cpu_us_per_request": {key: cpu_us(args.out, key, run, tp[key])
                                            for key, _ in series}})
        cpu = runs[-1]["cpu_us_per_request"]
        runs[-1]["cpu_ratios"] = {f"{n}/{d}": cpu[n] / cpu[d] for n, d in ratios
                                  if cpu[n] is not None and cpu[d]}
    width = max(len(label) for label in labels.values())
    for row in runs:
        note = "" if row["counted"] else f"  (steal over {args.steal_max:.0f}%: not counted)"
        print(f"run {row['run']}:{note}")
        for key, label in series:
            errors = row["errors"][key]
            extra = f"  ERRORS {errors}" if errors else ""
            cpu = row["cpu_us_per_request"][key]
            cpu = "" if cpu is None else f"  server CPU {cpu:.2f} us/request"
            print(f"  {label:<{width}} {row['throughput_per_s'][key]:>10.0f}/s  "
                  f"(steal {row['steal_percent'][key]:.0f}%){cpu}{extra}")
        for n, d in ratios:
            value = row["ratios"][f"{n}/{d}"]
            print(f"  ratio {labels[n]} / {labels[d]}: "
                  + ("n/a" if value is None else f"{value:.3f}"))
            value = row["cpu_ratios"].get(f"{n}/{d}")
            if value is not None:
                print(f"  server CPU per request, {labels[n]} / {labels[d]}: {value:.3f}")
    counted = [row for row in runs if row["counted"]]
    if not counted:
        print(f"warning: every run had steal over {args.steal_max:.0f}%: the medians are of runs "
              "that measured the host")
        counted = runs
    medians = {
        "throughput_per_s": {key: statistics.median(r["throughput_per_s"][key] for r in counted)
                             for key, _ in series},
        "ratios": {},
    }
    medians["cpu_us_per_request"] = {}
    for key, _ in series:
        values = [r["cpu_us_per_request"][key] for r in counted
                  if r["cpu_us_per_request"][key] is not None]
        medians["cpu_us_per_request"][key] = statistics.median(values) if values else None
    medians["cpu_ratios"] = {}
    for n, d in ratios:
        values = [r["ratios"][f"{n}/{d}"] for r in counted if r["ratios"][f"{n}/{d}"] is not None]
        medians["ratios"][f"{n}/{d}"] = statistics.median(values) if values else None
        values = [r["cpu_ratios"][f"{n}/{d}"] for r in counted if f"{n}/{d}" in r["cpu_ratios"]]
        medians["cpu_ratios"][f"{n}/{d}"] = statistics.median(values) if values else None
    print(f"median of {len(counted)} run(s):")
    for key, label in series:
        cpu = medians["cpu_us_per_request"][key]
        cpu = "" if cpu is None else f"  server CPU {cpu:.2f} us/request"
        print(f"  {label:<{width}} {medians['throughput_per_s'][key]:>10.0f}/s{cpu}")
    for n, d in ratios:
        value = medians["ratios"][f"{n}/{d}"]
        print(f"  ratio {labels[n]} / {labels[d]}: " + ("n/a" if value is None else f"{value:.3f}"))
        value = medians["cpu_ratios"][f"{n}/{d}"]
        if value is not None:
            print(f"  server CPU per request, {labels[n]} / {labels[d]}: {value:.3f}")
    summary = {"part": args.name, "labels": labels, "runs": runs, "medians": medians,
               "steal_max_percent": args.steal_max}
    with open(f"{args.out}/{args.name}.json", "w") as f:
        json.dump(summary, f, indent=2)


METRICS = (("p50", "p50"), ("p99", "p99"), ("p999", "p99.9"))


def sweep(args):
    steps = [int(s) for s in args.steps.split()]
    rows = []
    for pct in steps:
        sg = load(f"{args.out}/sweep-sg-{pct}.json")
        redis = load(f"{args.out}/sweep-redis-{pct}.json")
        rows.append({
            "percent": pct,
            "rate_per_s": sg["rate_per_s"],
            "settlegate": summarize(sg),
            "redis": summarize(redis),
        })
    verdict = judge(rows, args.redis_label)
    text = table(rows, args, verdict)
    print(text, end="")
    result = {"max_closed_loop_per_s": args.max, "redis": args.redis_label, "steps": rows,
              "verdict": verdict, "p99_goal_us": P99_GOAL_US}
    with open(f"{args.out}/sweep.json", "w") as f:
        json.dump(result, f, indent=2)
    with open(f"{args.out}/sweep.txt", "w") as f:
        f.write(text)
    with open(f"{args.out}/sweep.html", "w") as f:
        f.write(page(rows, args, text))


def summarize(report):
    kept_up = (report["errors"] == 0
               and report["throughput_per_s"] >= KEPT_UP_SHARE * report["rate_per_s"])
    return {
        "kept_up": kept_up,
        "served_per_s": report["throughput_per_s"],
        "latency_us": {key: report["latency_us"][key] for key, _ in METRICS},
        "errors": report["errors"],
        "unsent": report["unsent"],
        "steal_percent": steal(report),
    }


def judge(rows, redis_label):
    """The goal's two verdicts, with the steps that miss them. A server that did not keep up
    with a step (see KEPT_UP_SHARE) did not hold any latency there: settlegate misses the step;
    Redis's p99 is no bound for settlegate's there, nor a rate at which it held 1 ms."""

    def p99(row, side):
        return row[side]["latency_us"]["p99"]

    def held(row, side, bound):
        return row[side]["kept_up"] and p99(row, side) <= bound

    worse = [r["rate_per_s"] for r in rows
             if not held(r, "settlegate", p99(r, "redis") if r["redis"]["kept_up"] else math.inf)]
    within = [r["rate_per_s"] for r in rows if held(r, "redis", P99_GOAL_US)]
    top = max(within) if within else None
    over = [r["rate_per_s"] for r in rows if top is not None and r["rate_per_s"] <= top
            and not held(r, "settlegate", P99_GOAL_US)]
    return {
        "p99_at_most_redis_at_every_step": not worse,
        "steps_where_settlegate_p99_is_above_redis": worse,
        "redis_p99_within_1ms_up_to_per_s": top,
        "p99_within_1ms_up_to_that_rate": None if top is None else not over,
        "steps_where_settlegate_p99_is_above_1ms": over,
        "redis": redis_label,
    }


def table(rows, args, verdict):
    redis = args.redis_label
    lines = [f"latency against throughput: settlegate authorize and {redis}, open loop at "
             f"each share of settlegate's closed-loop maximum {args.max:.0f}/s",
             "corrected latency (from when each request was due), us",
             f"{'step':>5} {'rate/s':>9} | {'settlegate p50':>14} {'p99':>7} {'p99.9':>7} "
             f"{'served/s':>9} | {redis + ' p50':>18} {'p99':>7} {'p99.9':>7} {'served/s':>9}"
             " | notes"]
    for r in rows:
        s, q = r["settlegate"], r["redis"]
        notes = []
        for name, side in (("settlegate", s), ("redis", q)):
            if not side["kept_up"]:
                notes.append(f"{name} did not keep up")
            if side["errors"] or side["unsent"]:
                notes.append(f"{name}: {side['errors']} errors, {side['unsent']} unsent")
            if side["steal_percent"] > args.steal_max:
                notes.append(f"{name}: steal {side['steal_percent']:.0f}%")
        lines.append(
            f"{r['percent']:>4}% {r['rate_per_s']:>9.0f} | {s['latency_us']['p50']:>14} "
            f"{s['latency_us']['p99']:>7} {s['latency_us']['p999']:>7} {s['served_per_s']:>9.0f} | "
            f"{q['latency_us']['p50']:>18} {q['latency_us']['p99']:>7} "
            f"{q['latency_us']['p999']:>7} {q['served_per_s']:>9.0f} | {'; '.join(notes)}")
    v = verdict
    worse = ", ".join(f"{rate:.0f}/s" for rate in v["steps_where_settlegate_p99_is_above_redis"])
    lines.append(f"goal: settlegate p99 <= {redis} p99 at every step: "
                 + ("met" if v["p99_at_most_redis_at_every_step"] else f"NOT met (at {worse})"))
    top = v["redis_p99_within_1ms_up_to_per_s"]
    if top is None:
        lines.append(f"goal: settlegate p99 <= 1 ms up to the highest rate at which {redis} holds "
                     f"p99 <= 1 ms: n/a ({redis} held it at no step)")
    else:
        over = ", ".join(f"{rate:.0f}/s" for rate in v["steps_where_settlegate_p99_is_above_1ms"])
        lines.append(f"goal: settlegate p99 <= 1 ms up to {top:.0f}/s (the highest step at which "
                     f"{redis} holds p99 <= 1 ms): "
                     + ("met" if v["p99_within_1ms_up_to_that_rate"] else f"NOT met (at {over})"))
    return "\n".join(lines) + "\n"


# The plot: rate on a linear x axis, latency on a logarithmic y axis.
WIDTH, HEIGHT, LEFT, RIGHT, TOP, BOTTOM = 960, 560, 80, 200, 50, 60
COLORS = {"p50": "#1f77b4", "p99": "#d62728", "p999": "#2ca02c"}


def svg(rows, redis_label):
    """The plot; a server's step in which it answered nothing is left out, and one it did not
    keep up with is drawn hollow."""
    points = [(r["rate_per_s"], side, key, max(r[side]["latency_us"][key], 1))
              for r in rows for side in ("settlegate", "redis") for key, _ in METRICS
              if r[side]["served_per_s"] > 0] or [(1, "", "", P99_GOAL_US)]
    x_max = max(p[0] for p in points) * 1.05 or 1
    lo = 10 ** math.floor(math.log10(min(min(p[3] for p in points), P99_GOAL_US)))
    hi = 10 ** math.ceil(math.log10(max(max(p[3] for p in points), P99_GOAL_US) * 1.01))
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def x(rate):
        return LEFT + rate / x_max * plot_w

    def y(us):
        return TOP + plot_h - (math.log10(us) - math.log10(lo)) / math.log10(hi / lo) * plot_h

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
           f'font-family="sans-serif" font-size="12">',
           f'<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>',
           f'<text x="{WIDTH / 2}" y="24" text-anchor="middle" font-size="16">corrected latency '
           f'against the offered rate: settlegate authorize and {html.escape(redis_label)}</text>']
    decade = lo
    while decade <= hi:
        for m in range(1, 10):
            us = decade * m
            if us > hi:
                break
            major = m == 1
            out.append(f'<line x1="{LEFT}" x2="{LEFT + plot_w}" y1="{y(us):.1f}" y2="{y(us):.1f}" '
                       f'stroke="{"#bbb" if major else "#eee"}"/>')
            if major:
                label = f"{us / 1000:g} ms"
                out.append(f'<text x="{LEFT - 6}" y="{y(us) + 4:.1f}" text-anchor="end">{label}</text>')
        decade *= 10
    # Ticks 1, 2 or 5 times a power of ten apart, at most 10 of them.
    step = 10 ** math.floor(math.log10(x_max / 10)) if x_max > 10 else 1
    step = next(step * m for m in (1, 2, 5, 10) if x_max / (step * m) <= 10)
    tick = 0.0
    while tick <= x_max:
        out.append(f'<line x1="{x(tick):.1f}" x2="{x(tick):.1f}" y1="{TOP}" y2="{TOP + plot_h}" '
                   f'stroke="#eee"/>')
        out.append(f'<text x="{x(tick):.1f}" y="{TOP + plot_h + 18}" text-anchor="middle">'
                   f'{tick / 1000:g}k</text>')
        tick += step
    out.append(f'<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" fill="none" '
               f'stroke="black"/>')
    out.append(f'<line x1="{LEFT}" x2="{LEFT + plot_w}" y1="{y(P99_GOAL_US):.1f}" '
               f'y2="{y(P99_GOAL_US):.1f}" stroke="black" stroke-dasharray="2,3"/>')
    out.append(f'<text x="{WIDTH / 2}" y="{HEIGHT - 16}" text-anchor="middle">offered rate '
               f'(requests/s, open loop)</text>')
    out.append(f'<text transform="translate(18,{TOP + plot_h / 2}) rotate(-90)" '
               f'text-anchor="middle">latency (log scale)</text>')
    legend_y = TOP + 10
    for side, dash, name in (("settlegate", "", "settlegate"), ("redis", "7,4", redis_label)):
        for key, label in METRICS:
            line = [(x(r["rate_per_s"]), y(max(r[side]["latency_us"][key], 1)), r[side]["kept_up"])
                    for r in rows if r[side]["served_per_s"] > 0]
            path = " ".join(f"{px:.1f},{py:.1f}" for px, py, _ in line)
            style = f'stroke="{COLORS[key]}" stroke-width="2" fill="none"'
            if dash:
                style += f' stroke-dasharray="{dash}"'
            out.append(f'<polyline points="{path}" {style}/>')
            for px, py, kept_up in line:
                fill = COLORS[key] if kept_up else "white"
                out.append(f'<circle cx="{px:.1f}" cy="{py:.1f}" r="3.5" fill="{fill}" '
                           f'stroke="{COLORS[key]}"/>')
            lx = LEFT + plot_w + 14
            out.append(f'<line x1="{lx}" x2="{lx + 24}" y1="{legend_y}" y2="{legend_y}" {style}/>')
            out.append(f'<text x="{lx + 30}" y="{legend_y + 4}">{html.escape(name)} {label}</text>')
            legend_y += 20
        legend_y += 10
    out.append(f'<text x="{LEFT + plot_w + 14}" y="{legend_y + 4}">dotted: 1 ms</text>')
    out.append(f'<text x="{LEFT + plot_w + 14}" y="{legend_y + 24}">hollow: did not keep up</text>')
    out.append("</svg>")
    return "\n".join(out)


def page(rows, args, text):
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head><meta charset=\"utf-8\">"
            "<title>settlegate: latency against throughput</title></head>\n<body>\n"
            "<h1>settlegate: latency against throughput</h1>\n"
            f"<pre>{html.escape(text)}</pre>\n{svg(rows, args.redis_label)}\n</body>\n</html>\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compare")
    c.add_argument("--out", required=True)
    c.add_argument("--runs", type=int, required=True)
    c.add_argument("--steal-max", type=float, default=5.0)
    c.add_argument("--name", required=True)
    c.add_argument("--series", action="append", required=True)
    c.add_argument("--ratio", action="append", default=[])
    s = sub.add_parser("sweep")
    s.add_argument("--out", required=True)
    s.add_argument("--max", type=float, required=True)
    s.add_argument("--steps", required=True)
    s.add_argument("--steal-max", type=float, default=5.0)
    s.add_argument("--redis-label", default="redis SET")
    args = parser.parse_args()
    {"compare": compare, "sweep": sweep}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
