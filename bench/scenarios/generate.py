#!/usr/bin/env python3
"""Generates the workloads of the planner scenarios (deterministic: fixed seeds).

    python3 bench/scenarios/generate.py

Each scenario is a folder with config.toml (simulated providers, prices,
limits), workload.jsonl (job lines with submit_at and sim.output_tokens) and
start.txt (the virtual start time). Run one with:

    nightshift simulate --config bench/scenarios/nightly-backlog/config.toml \
        --workload bench/scenarios/nightly-backlog/workload.jsonl \
        --start "$(cat bench/scenarios/nightly-backlog/start.txt)" \
        --policy planner --policy cheapest-now --lower-bound
"""
import json
import os
import random

HERE = os.path.dirname(os.path.abspath(__file__))

TOPICS = ["billing", "login", "export", "invoice", "latency", "refund", "password", "upgrade", "crash", "search"]


def job(custom_id, model, submit_at, deadline, rng, max_tokens=200):
    words = " ".join(rng.choice(TOPICS) for _ in range(rng.randint(8, 40)))
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {
            "model": model,
            "messages": [
                {"role": "system", "content": "Classify the ticket and extract the product area."},
                {"role": "user", "content": words},
            ],
            "max_tokens": max_tokens,
        },
        "nightshift": {"deadline": deadline},
        "submit_at": submit_at,
        "sim": {"output_tokens": rng.randint(max_tokens // 10, max_tokens)},
    }


def write(name, config, start, jobs):
    d = os.path.join(HERE, name)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "config.toml"), "w") as f:
        f.write(config)
    with open(os.path.join(d, "start.txt"), "w") as f:
        f.write(start + "\n")
    with open(os.path.join(d, "workload.jsonl"), "w") as f:
        for j in jobs:
            f.write(json.dumps(j, separators=(",", ":")) + "\n")


DEEPSEEK_WINDOWS = """
[[providers.price_windows]]
name = "peak"
days = ["mon", "tue", "wed", "thu", "fri"]
hours = ["01:00-04:00", "06:00-10:00"]
multiplier = 1.0

[[providers.price_windows]]
name = "off-peak"
multiplier = 0.5
"""

DAEMON = """[daemon]
default_deadline = "24h"
safety_margin = "10m"
"""


def nightly_backlog():
    """A nightly export lands during DeepSeek's peak hours (Tue 01:00-03:00
    UTC), due by the start of the working day. Waiting for the 04:00-06:00
    off-peak window halves the bill."""
    config = DAEMON + f"""
[[providers]]
name = "deepseek"
kind = "simulated"
latency = "800ms"
ms_per_output_token = 8.0
rpm = 120
tpm = 400_000
concurrency = 64
{DEEPSEEK_WINDOWS}
[[providers.models]]
name = "deepseek-flash"
input_per_mtok = 0.30
output_per_mtok = 1.20

[[providers]]
name = "google"
kind = "simulated"
latency = "600ms"
ms_per_output_token = 5.0
rpm = 300
tpm = 1_000_000
concurrency = 64

[[providers.models]]
name = "gemini-2.5-flash"
input_per_mtok = 0.30
output_per_mtok = 2.50

[classes]
chat = ["deepseek/deepseek-flash", "google/gemini-2.5-flash"]
"""
    rng = random.Random(1)
    jobs = []
    for i in range(6000):
        offset = i * 7200 // 6000  # two hours of arrivals
        jobs.append(job(f"nightly-{i:05}", "chat", f"+{offset}s", "2026-11-24T11:00:00Z", rng))
    write("nightly-backlog", config, "2026-11-24T01:00:00Z", jobs)


def steady_mixed():
    """A steady stream for 24 hours from Monday 00:00 UTC across three
    providers, with deadlines of 1, 8 and 24 hours. OpenAI's model comes
    through a router with a 20% markup."""
    config = DAEMON + f"""
[[providers]]
name = "deepseek"
kind = "simulated"
latency = "800ms"
ms_per_output_token = 8.0
rpm = 60
tpm = 200_000
concurrency = 32
{DEEPSEEK_WINDOWS}
[[providers.models]]
name = "deepseek-flash"
input_per_mtok = 0.30
output_per_mtok = 1.20

[[providers]]
name = "openai"
kind = "simulated"
latency = "500ms"
ms_per_output_token = 4.0
markup = 0.2
rpm = 500
tpm = 2_000_000
concurrency = 64

[[providers.models]]
name = "gpt-4o-mini"
input_per_mtok = 0.15
output_per_mtok = 0.60

[[providers]]
name = "google"
kind = "simulated"
latency = "600ms"
ms_per_output_token = 5.0
rpm = 300
tpm = 1_000_000
concurrency = 64

[[providers.models]]
name = "gemini-2.5-flash"
input_per_mtok = 0.30
output_per_mtok = 2.50

[classes]
chat = ["deepseek/deepseek-flash", "openai/gpt-4o-mini", "google/gemini-2.5-flash"]
"""
    rng = random.Random(2)
    jobs = []
    for i in range(2880):
        deadline = rng.choices(["1h", "8h", "24h"], weights=[3, 4, 3])[0]
        jobs.append(job(f"stream-{i:05}", "chat", f"+{i * 30}s", deadline, rng))
    write("steady-mixed", config, "2026-11-23T00:00:00Z", jobs)


def burst():
    """8,000 jobs at once, due in 3 hours: more than the two cheapest
    providers can take at once, so rate limits, not prices, decide."""
    config = DAEMON + """
[[providers]]
name = "mistral"
kind = "simulated"
latency = "400ms"
ms_per_output_token = 4.0
rpm = 25
tpm = 200_000
concurrency = 16

[[providers.models]]
name = "mistral-small"
input_per_mtok = 0.10
output_per_mtok = 0.30

[[providers]]
name = "google"
kind = "simulated"
latency = "600ms"
ms_per_output_token = 5.0
rpm = 25
tpm = 200_000
concurrency = 16

[[providers.models]]
name = "gemini-2.5-flash-lite"
input_per_mtok = 0.10
output_per_mtok = 0.40

[[providers]]
name = "openai"
kind = "simulated"
latency = "500ms"
ms_per_output_token = 4.0
rpm = 500
tpm = 2_000_000
concurrency = 64

[[providers.models]]
name = "gpt-4o-mini"
input_per_mtok = 0.15
output_per_mtok = 0.60

[classes]
bulk = ["mistral/mistral-small", "google/gemini-2.5-flash-lite", "openai/gpt-4o-mini"]
"""
    rng = random.Random(3)
    jobs = [job(f"burst-{i:05}", "bulk", "+0s", "3h", rng) for i in range(8000)]
    write("burst", config, "2026-11-25T12:00:00Z", jobs)


CHEAP_AND_DEAR = """
[[providers.models]]
name = "mistral-small"
input_per_mtok = 0.10
output_per_mtok = 0.30

[[providers]]
name = "openai"
kind = "simulated"
latency = "500ms"
ms_per_output_token = 2.0
rpm = 500
tpm = 4_000_000
concurrency = 64

[[providers.models]]
name = "gpt-4o-mini"
input_per_mtok = 0.15
output_per_mtok = 0.60

[classes]
bulk = ["mistral/mistral-small", "openai/gpt-4o-mini"]
"""


def skewed():
    """10,000 jobs at once, due in 4 hours, most short and a fifth long
    (800-1,200 output tokens, max_tokens 2400 against 120 for the short
    ones): the cheap provider's 25 rpm takes a third of them, so which jobs
    go there matters: the long ones should."""
    config = DAEMON + """
[[providers]]
name = "mistral"
kind = "simulated"
latency = "400ms"
ms_per_output_token = 1.0
rpm = 25
tpm = 2_000_000
concurrency = 32
""" + CHEAP_AND_DEAR
    rng = random.Random(4)
    jobs = []
    for i in range(10000):
        # The long jobs ask for more (max_tokens), as real long-form
        # requests do: the skew is visible before the job runs.
        long = rng.random() < 0.2
        j = job(f"skewed-{i:05}", "bulk", "+0s", "4h", rng, max_tokens=2400 if long else 120)
        j["sim"]["output_tokens"] = rng.randint(800, 1200) if long else rng.randint(20, 60)
        jobs.append(j)
    write("skewed", config, "2026-11-25T12:00:00Z", jobs)


def flaky():
    """4,000 jobs at once, due in 3 hours; the cheapest provider fails 25%
    of its requests (failed attempts are not billed but use its 25 rpm)."""
    config = DAEMON + """
[[providers]]
name = "mistral"
kind = "simulated"
latency = "400ms"
ms_per_output_token = 4.0
failure_rate = 0.25
rpm = 25
tpm = 200_000
concurrency = 16
""" + CHEAP_AND_DEAR
    rng = random.Random(5)
    jobs = [job(f"flaky-{i:05}", "bulk", "+0s", "3h", rng) for i in range(4000)]
    write("flaky", config, "2026-11-25T12:00:00Z", jobs)


def rpd():
    """A stream of 9,000 jobs over 36 hours, due in 12 hours; the cheap
    provider allows 3,000 requests a rolling day (and 60 rpm, 4 at a time
    with 5 s answers: concurrency, not rpm, binds within a minute)."""
    config = DAEMON + """
[[providers]]
name = "mistral"
kind = "simulated"
latency = "5s"
ms_per_output_token = 0.0
rpm = 60
rpd = 3000
concurrency = 4
""" + CHEAP_AND_DEAR
    rng = random.Random(6)
    jobs = [job(f"rpd-{i:05}", "bulk", f"+{i * 36 * 3600 // 9000}s", "12h", rng) for i in range(9000)]
    write("rpd", config, "2026-11-25T00:00:00Z", jobs)


def short_deadline():
    """240 jobs at once due in 5 minutes; the 60-rpm provider becomes the
    cheapest 60 s after the start. About 210 fit on it before the deadline
    minus the 30 s margin."""
    config = """[daemon]
default_deadline = "24h"
safety_margin = "30s"

[[providers]]
name = "mistral"
kind = "simulated"
latency = "400ms"
ms_per_output_token = 1.0
rpm = 60
tpm = 2_000_000
concurrency = 16

[[providers.price_windows]]
name = "happy-hour"
hours = ["12:00-13:00"]
multiplier = 0.5

[[providers.models]]
name = "mistral-small"
input_per_mtok = 0.20
output_per_mtok = 0.80

[[providers]]
name = "openai"
kind = "simulated"
latency = "500ms"
ms_per_output_token = 2.0
rpm = 500
tpm = 4_000_000
concurrency = 64

[[providers.models]]
name = "gpt-4o-mini"
input_per_mtok = 0.15
output_per_mtok = 0.60

[classes]
bulk = ["mistral/mistral-small", "openai/gpt-4o-mini"]
"""
    rng = random.Random(7)
    jobs = [job(f"short-{i:05}", "bulk", "+0s", "5m", rng) for i in range(240)]
    write("short-deadline", config, "2026-11-25T11:59:00Z", jobs)


def batch_channels():
    """Batch channels against off-peak windows and short deadlines. Starts
    Tue 06:00 UTC, in DeepSeek's peak (off-peak from 10:00). OpenAI has a
    Batch API at half price and flex on gpt-5-mini; Anthropic a Batch API;
    DeepSeek none. 1,200 cheap-chat jobs due in 24 h (gpt-4o-mini batch
    0.075/0.30 beats DeepSeek off-peak 0.15/0.60), 400 smart-chat jobs due in
    6 h (batch), 300 due 20 minutes after submission, spread over two hours
    (must stay synchronous: sync or flex), and 300 output-heavy pro-chat jobs
    due in 12 h where DeepSeek off-peak (0.66/1.98) beats Anthropic's batch
    (0.50/2.50), and 200 cheap-chat jobs submitted an hour in, due in 36 h.
    OpenAI's batches hold at most 150 requests; 5% of simulated batches come
    back late (the whole window), and 20% of OpenAI's are expired by the
    provider at the window with a drawn share of their lines not run: a
    batch of 24 h jobs is then cancelled first by the deadline guard, a
    batch of 36 h jobs expires and its unrun lines run again. 10% of flex
    requests are refused (429 resource_unavailable): sent again on the
    standard channel, and flex backs off."""
    config = DAEMON + """
[[providers]]
name = "deepseek"
kind = "simulated"
latency = "800ms"
ms_per_output_token = 8.0
rpm = 300
tpm = 2_000_000
concurrency = 64
""" + DEEPSEEK_WINDOWS + """
[[providers.models]]
name = "deepseek-flash"
input_per_mtok = 0.30
output_per_mtok = 1.20

[[providers.models]]
name = "deepseek-v4-pro"
input_per_mtok = 1.32
output_per_mtok = 3.96

[[providers]]
name = "openai"
kind = "simulated"
latency = "500ms"
ms_per_output_token = 2.0
rpm = 500
tpm = 4_000_000
concurrency = 64

[providers.batch]
discount = 0.5
expected_turnaround = "1h"
max_requests = 150
simulated_turnaround = ["2m", "40m"]
simulated_late_fraction = 0.05
simulated_expire_fraction = 0.2

[providers.flex]
discount = 0.5
models = ["gpt-5-mini"]
simulated_refusal_fraction = 0.1

[[providers.models]]
name = "gpt-4o-mini"
input_per_mtok = 0.15
output_per_mtok = 0.60

[[providers.models]]
name = "gpt-5-mini"
input_per_mtok = 0.25
output_per_mtok = 2.00

[[providers]]
name = "anthropic"
kind = "simulated"
latency = "700ms"
ms_per_output_token = 4.0
rpm = 200
tpm = 1_000_000
concurrency = 32

[providers.batch]
discount = 0.5
expected_turnaround = "1h"
simulated_turnaround = ["5m", "50m"]
simulated_late_fraction = 0.05

[[providers.models]]
name = "claude-haiku-4-5"
input_per_mtok = 1.00
output_per_mtok = 5.00

[classes]
cheap-chat = ["deepseek/deepseek-flash", "openai/gpt-4o-mini"]
smart-chat = ["openai/gpt-5-mini", "anthropic/claude-haiku-4-5"]
pro-chat = ["deepseek/deepseek-v4-pro", "anthropic/claude-haiku-4-5"]
"""
    rng = random.Random(8)
    jobs = []
    jobs += [job(f"backlog-{i:05}", "cheap-chat", "+0s", "24h", rng) for i in range(1200)]
    jobs += [job(f"six-{i:05}", "smart-chat", f"+{i * 3}s", "6h", rng) for i in range(400)]
    for i in range(300):
        model = "cheap-chat" if i % 2 == 0 else "smart-chat"
        jobs.append(job(f"short-{i:05}", model, f"+{i * 24}s", "20m", rng))
    for i in range(300):
        j = job(f"pro-{i:05}", "pro-chat", "+0s", "12h", rng, max_tokens=1000)
        j["sim"]["output_tokens"] = rng.randint(600, 1000)
        jobs.append(j)
    jobs += [job(f"later-{i:05}", "cheap-chat", "+3600s", "36h", rng) for i in range(200)]
    jobs.sort(key=lambda j: int(j["submit_at"][1:-1]))
    write("batch-channels", config, "2026-11-24T06:00:00Z", jobs)


if __name__ == "__main__":
    nightly_backlog()
    steady_mixed()
    burst()
    skewed()
    flaky()
    rpd()
    short_deadline()
    batch_channels()
