"""The console: a live web page of agents, traffic, conversations, memory and model calls.

    config.py          ConsoleConfig: where it listens, whether operator actions are allowed, bounds
    feed.py            LiveFeed: reads the newest of the log, keeps recent envelopes and
                       per-second counts, pushes aggregated batches to every open page (bounded)
    health.py          HealthSampler: consumer backlogs and projection lag, sampled every few seconds
    queries.py         the SQL each page runs through the query service (parameters only)
    context_window.py  a recorded model request split into its parts, with token estimates
    diagram.py         a conversation's steps as lanes and rows (repeats collapsed) for the drawing
    replay.py          replaying a conversation from the page (`bus replay`, one at a time)
    params.py          HTTP parameters checked and converted, or a 400 saying what was wrong
    routes.py          the HTTP endpoints (pages, JSON, server-sent events, operator actions)
    app.py             the ASGI application and what it owns (its Bus, the feed, the sampler)
    serve.py           running it under uvicorn on a socket of our own
    static/            the page: HTML, CSS and vanilla JS, served from the package (no CDN)

It reads only through the bus like every other client: queries over the query service, live data
from the log by batched direct gets; operator actions go through `bus.redrive` and
`bus.agent_control` and are recorded.
"""
